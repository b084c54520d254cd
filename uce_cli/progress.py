"""Progress reporting the library can call without knowing who renders it (Rich, or nothing)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives stage starts and advances; the CLI renders them as Rich bars on stderr."""

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        """Begin a stage of ``total`` steps (None: unknown)."""

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more steps of the current stage done."""

    def finish(self) -> None:
        """End the current stage."""


class NullProgress:
    """Reports nothing: the default for library calls and tests."""

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass
