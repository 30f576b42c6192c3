"""The one exception type of vitslim.export."""

from vitslim.core.errors import VitslimError


class ExportError(VitslimError, RuntimeError):
    """An export that cannot be done or that failed its checks; the message says what to do."""
