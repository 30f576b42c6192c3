"""The one exception type of vitslim.deploy."""

from vitslim.core.errors import VitslimError


class DeployError(VitslimError, RuntimeError):
    """A build, load, comparison or gate that cannot proceed; the message says what to do."""
