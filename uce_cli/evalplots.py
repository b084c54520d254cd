"""Plots of an evaluation report (PNG via matplotlib, an optional dependency: the `eval` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(folder: Path, report: dict[str, Any], run: Path) -> list[str]:
    """Placeholder until the plots land; returns the written file names (relative to folder)."""
    return []
