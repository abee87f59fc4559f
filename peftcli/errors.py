"""Errors a user can fix: each carries a one-line message that says where, what and how to fix it.

The CLI turns a PeftcliError into `error: <message>` on stderr and exit code 2, without a traceback
(unless --debug). Anything else escaping a command is a bug in peftcli and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's first line of text (cut at `limit` characters), or its type's name when it has none:
    what a one-line error quotes of the library error behind it."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class PeftcliError(Exception):
    """A problem with the user's input (recipe, files, arguments), reported as one or more lines."""

    exit_code = 2
    prefix = "error"

    def __init__(self, *lines: str) -> None:
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class RecipeError(PeftcliError):
    """One or more problems found in a recipe; all of them are reported at once."""


class ModelError(PeftcliError):
    """The base model could not be found or loaded, or does not fit the task."""


class DataError(PeftcliError):
    """The dataset could not be loaded or lacks what the task needs."""


class MethodError(PeftcliError):
    """A method cannot be applied as configured (for example target modules that match nothing)."""


class CheckpointError(PeftcliError):
    """An adapter folder is missing, corrupt, or does not fit the base model."""


class TrainingDiverged(PeftcliError):
    """The loss stopped being finite; the run stopped and its last good checkpoint is kept."""

    exit_code = 1


class RunInterrupted(PeftcliError):
    """SIGINT or SIGTERM: the run saved a checkpoint at a step boundary and stopped (exit 128 + signal)."""

    prefix = "stopped"

    def __init__(self, signal: int, *lines: str) -> None:
        super().__init__(*lines)
        self.exit_code = 128 + signal
