"""Where uce keeps its cache (tiny model, fetched data files, preserve statistics), and ``~`` in paths."""

from __future__ import annotations

import os
from pathlib import Path

from uce_cli.errors import RecipeError, UceError

CACHE_ENV = "UCE_CACHE_DIR"


def expand_home(path: str | os.PathLike[str], what: str, error: type[UceError] = UceError) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded.

    Raises:
        UceError: (or ``error``) naming ``what`` when no home directory is known (``HOME`` unset,
            no such user).
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        message = (
            f"{what} {str(path)!r}: cannot expand '~' — no home directory is known for it (HOME "
            "unset, or no such user); write the path in full"
        )
        raise (error([message]) if issubclass(error, RecipeError) else error(message)) from None


def cache_dir() -> Path:
    """Return the uce cache folder: ``$UCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/uce``, else ``~/.cache/uce``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return expand_home(explicit, CACHE_ENV)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return expand_home(xdg, "XDG_CACHE_HOME") / "uce"
    base = expand_home("~", f"the uce cache (set {CACHE_ENV})") / ".cache"
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
