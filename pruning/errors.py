"""The one exception type of pruning/: raised for bad user input, with a message that says how to fix it."""


class PruningError(ValueError):
    """A plan, model, checkpoint, data set or setting that vitslim cannot use.

    The message is one line that names the problem and what to do; the CLI prints it as is.
    """
