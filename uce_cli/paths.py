"""Where uce keeps its cache (tiny model, fetched data files, preserve statistics)."""

from __future__ import annotations

import os
from pathlib import Path

from uce_cli.errors import UceError

CACHE_ENV = "UCE_CACHE_DIR"


def cache_dir() -> Path:
    """Return the uce cache folder: ``$UCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/uce``, else ``~/.cache/uce``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "uce"


def cache_folder(*parts: str) -> Path:
    """A folder of the cache that uce needs (not merely would like), created if missing.

    Raises:
        UceError: naming the path when it cannot be a folder (a file in the way, read-only, …).
    """
    root = cache_dir()
    folder = root.joinpath(*parts)
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                setting = (
                    f" ({CACHE_ENV}={os.environ[CACHE_ENV]})" if CACHE_ENV in os.environ else ""
                )
                raise UceError(
                    f"the uce cache {root}{setting} cannot hold {folder}: {candidate} is a file, "
                    f"not a folder — point {CACHE_ENV} at a folder, or move the file away"
                )
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UceError(
            f"cannot create the uce cache folder {folder}: {exc.strerror or exc} — set "
            f"{CACHE_ENV} to a writable folder"
        ) from None
    return folder
