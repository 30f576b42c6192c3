"""The root of vitslim's exception types.

Each package raises its own subclass (`PruningError`, `ExportError`, `DeployError`), so a caller
can catch one package's errors or all of vitslim's with `except VitslimError`. The message is one
line that names the problem and how to fix it; the CLI prints it as is (a traceback only with
--debug) and exits EXIT_BAD_INPUT. The API never raises SystemExit.

Exit codes of the CLI (README, "Errors and recovery"):
  0 success / gate pass; 1 a check failed (compare parity, gate regression, a refused --accept
  of a failing result); 2 gate undecided or not comparable; 3 bad input or a check that cannot
  proceed (this exception, and argparse usage errors); 130 interrupted (SIGINT), 143 terminated
  (SIGTERM): rerun the same command to resume from the last checkpoint.
"""

EXIT_BAD_INPUT = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class VitslimError(Exception):
    """Bad input or a failed check anywhere in vitslim; the message says what to do."""
