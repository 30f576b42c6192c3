"""The root of vitslim's exception types, and every exit code of the CLI.

Each package raises its own subclass (`PruningError`, `ExportError`, `DeployError`), so a caller
can catch one package's errors or all of vitslim's with `except VitslimError`. The message is one
line that names the problem and how to fix it; the CLI prints it as is (a traceback only with
--debug) and exits EXIT_BAD_INPUT. The API never raises SystemExit.

The exit codes (README, "Exit codes") are declared here and nowhere else. A verdict (0, 1, 2) is
never used for a crash: an exception vitslim did not anticipate exits EXIT_INTERNAL_ERROR, so CI
cannot read a traceback as "regression".
"""

EXIT_OK = 0  # success; gate: pass; selftest: every check passed
# compare parity outside tolerance, gate regression, a refused gate --accept, a failed selftest check
EXIT_CHECK_FAILED = 1
EXIT_UNDECIDED = 2  # gate undecided or not comparable; selftest without a GPU (builds checked, nothing run)
EXIT_BAD_INPUT = 3  # VitslimError and argparse usage errors: one line naming the problem and the fix
EXIT_INTERNAL_ERROR = 4  # an exception vitslim did not anticipate (a bug): one line, --debug for the traceback
EXIT_INTERRUPTED = 130  # SIGINT: rerun the same command to resume
EXIT_TERMINATED = 143  # SIGTERM: rerun the same command to resume


class VitslimError(Exception):
    """Bad input or a failed check anywhere in vitslim; the message says what to do."""
