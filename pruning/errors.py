"""The one exception type of vitslim.pruning."""

from vitslim.core.errors import VitslimError


class PruningError(VitslimError, ValueError):
    """A plan, model, checkpoint, data set or setting that vitslim cannot use.

    The message is one line that names the problem and what to do; the CLI prints it as is.
    """
