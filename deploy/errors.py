"""The one exception type of vitslim.deploy."""
from vitslim.errors import VitslimError


class DeployError(VitslimError, RuntimeError):
    """A build, load, comparison or gate that cannot proceed; the message says what to do."""
