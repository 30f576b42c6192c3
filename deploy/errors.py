"""The one exception type of deploy/."""


class DeployError(RuntimeError):
    """A build, load, comparison or gate that cannot proceed; the message says what to do."""
