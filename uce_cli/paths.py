"""Where uce keeps its cache (tiny model, fetched data files, preserve statistics)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "UCE_CACHE_DIR"


def cache_dir() -> Path:
    """Return the uce cache folder: ``$UCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/uce``, else ``~/.cache/uce``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "uce"
