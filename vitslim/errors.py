"""The root of vitslim's exception types.

Each package raises its own subclass (`PruningError`, `ExportError`, `DeployError`), so a caller
can catch one package's errors or all of vitslim's with `except VitslimError`. The message is one
line that names the problem and how to fix it; the CLI prints it as is and exits 2. The API never
raises SystemExit.
"""


class VitslimError(Exception):
    """Bad input or a failed check anywhere in vitslim; the message says what to do."""
