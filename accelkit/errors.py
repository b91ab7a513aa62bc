"""Errors that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class AccelkitError(Exception):
    """Base class of errors caused by the user's input or environment.

    The CLI prints ``str(error)`` on one line (no traceback unless ``--debug``) and exits with
    ``exit_code``. The message should say what was wrong and how to fix it.
    """

    exit_code = 2


class InputError(AccelkitError):
    """Bad user input: a path, a model, an argument, a plan that does not fit."""


class CaptureError(AccelkitError):
    """The denoiser could not be captured as a graph."""


class PlanMismatchError(AccelkitError):
    """A plan was made for other weights, scheduler, step count or resolution."""


class BudgetNotMetError(AccelkitError):
    """A budget or fidelity floor could not be met (CI contract: exit code 3)."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the CLI exits with ``128 + signum`` (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int = 2) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


#: Exit codes of every ``accelkit`` command (the README's table lists the same).
EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with the --debug traceback)",
    2: "bad input or environment (the message names the fix); nothing was half-written",
    3: "a budget or the --min-psnr floor was not met (plans and report are still written)",
    4: "the search finished but some trials raised (recorded in the study and the report's notes)",
    130: "interrupted by Ctrl-C (SIGINT)",
    143: "terminated (SIGTERM)",
}
