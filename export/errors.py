"""The one exception type of export/."""


class ExportError(RuntimeError):
    """An export that cannot be done or that failed its checks; the message says what to do."""
