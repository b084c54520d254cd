"""Terminal rendering shared by the CLI commands: consoles, Rich progress, error printing."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

# Piped or redirected results are read by programs and pagers, not a terminal: Rich would wrap
# them at 80 columns and cut table cells (a 63-character layer name). Render them this wide
# instead, unless COLUMNS says otherwise.
PIPE_WIDTH = 240


def _results_width() -> int | None:
    """None (Rich asks the terminal) on a terminal or with COLUMNS set, else PIPE_WIDTH."""
    if sys.stdout is not None and sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return PIPE_WIDTH


# Results go to stdout; progress, status and errors to stderr.
out = Console(soft_wrap=True, width=_results_width())
err = Console(stderr=True, soft_wrap=True)


def plural(count: int, noun: str) -> str:
    """``1 edit prompt``, ``2 edit prompts``: a count with its noun in the right number."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class _BarsBelow(Progress):
    """Rich progress bars with one extra renderable (e.g. the debias loop's table) above them."""

    extra: RenderableType | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        if self.extra is not None:
            yield self.extra
        yield self.make_tasks_table(self.tasks)


class RichProgress:
    """The library's Progress protocol rendered as Rich bars on stderr (off when quiet / not a TTY)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bars: Progress | None = None
        self._task: int | None = None
        self._unit = ""

    def __enter__(self) -> RichProgress:
        if self.enabled:
            self._bars = _BarsBelow(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=err,
                transient=False,
            )
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def show(self, renderable: Any) -> None:
        """Keep ``renderable`` on screen above the bars, replacing the previous one."""
        if self._bars is None:
            return
        self._bars.extra = renderable
        self._bars.refresh()

    def start(self, stage: str, total: int | None = None, unit: str = "") -> None:
        if self._bars is None:
            return
        self.finish()
        self._unit = unit
        self._task = self._bars.add_task(stage, total=total, rate="")

    def advance(self, n: int = 1) -> None:
        if self._bars is None or self._task is None:
            return
        self._bars.advance(self._task, n)
        task = self._bars.tasks[self._task]
        if self._unit and task.elapsed:
            self._bars.update(
                self._task, rate=f"{task.completed / task.elapsed:.1f} {self._unit}/s"
            )

    def finish(self) -> None:
        if self._bars is None or self._task is None:
            return
        task = self._bars.tasks[self._task]
        total = task.total if task.total is not None else 1
        self._bars.update(self._task, total=total, completed=total)
        self._task = None


def silence_third_party() -> None:
    """Turn off transformers'/diffusers' own progress bars and notices: uce renders its own.

    The environment variables set at CLI start-up only work before those libraries are imported;
    this also covers an already-imported library (e.g. under a test runner).
    """
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
