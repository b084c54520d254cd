"""The exceptions uce raises for problems a user can fix; each message is written for that user."""

from __future__ import annotations


class UceError(Exception):
    """A problem the user can act on; the CLI prints its message as ``error: …`` and exits 1."""


class RecipeError(UceError):
    """A recipe failed validation; ``problems`` holds every problem found, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelError(UceError):
    """The base model cannot be opened or has no layers uce can edit."""


class SolveError(UceError):
    """The closed-form system cannot be solved as asked (e.g. singular with lambda = 0)."""


class OutputError(UceError):
    """An output cannot be written where or how it was asked."""


class EditFileError(UceError):
    """An edit file (delta, LoRA, operator, checkpoint) is missing, corrupt or does not fit the base."""


class DataError(UceError):
    """A concept or prompt file cannot be read or fetched."""


def is_interrupt(exc: BaseException) -> bool:
    """True for Ctrl-C, including one pydantic-core wrapped while it built a validator.

    A KeyboardInterrupt raised while pydantic-core builds a model's validator (at import, when
    the CLI's models are defined) comes out as a ``SchemaError`` whose message names it: that is
    still the user pressing Ctrl-C, not a bug.
    """
    if isinstance(exc, KeyboardInterrupt):
        return True
    return type(exc).__name__ == "SchemaError" and "KeyboardInterrupt" in str(exc)


class UceWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints ``warning: …``."""
