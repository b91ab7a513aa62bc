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
