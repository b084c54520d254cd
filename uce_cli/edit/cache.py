"""On-disk cache of preserve statistics: the float64 Gram matrix of a preserve set, encoded once.

A second ``uce apply`` with the same preserve set (e.g. 1,734 artists) reuses ``G_p`` instead of
re-encoding thousands of prompts. The key covers everything ``G_p`` depends on: the text
encoder's weights (sha256), its compute dtype, the alignment mode, the token length and the exact
prompt list. The stored matrix is unscaled, so the solver scales (λ, s_e, s_p) need not be part of
the key: a cached set serves every scale exactly. Entries carry a checksum of their bytes; a
corrupt or mismatched entry is detected, reported and rebuilt, never used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from uce_cli.errors import UceError, UceWarning
from uce_cli.paths import CACHE_ENV, cache_dir
from uce_cli.safe_files import write_file

FORMAT = "uce-preserve-gram-v1"


@dataclass(frozen=True)
class PreserveEntry:
    """A cached preserve Gram matrix and how many vectors it sums."""

    G_p: torch.Tensor
    n_vectors: int


def preserve_key(
    encoder_sha256: str, prompts: list[str], alignment: str, max_length: int, dtype: str
) -> str:
    """The cache key of a preserve set: sha256 over everything G_p depends on."""
    payload = json.dumps(
        {
            "format": FORMAT,
            "encoder": encoder_sha256,
            "dtype": dtype,
            "alignment": alignment,
            "max_length": max_length,
            "prompts": prompts,
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "preserve" / f"{key}.safetensors"


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def load_preserve(key: str) -> tuple[PreserveEntry | None, str]:
    """Look a preserve set up. Returns (entry or None, status: hit | miss | corrupt).

    The cache is an optimisation: an entry that cannot be read (not a file, unreadable, corrupt)
    is a miss or a rebuilt entry, never a failed run.
    """
    path = _path(key)
    try:
        if not path.is_file():
            return None, "miss"
    except OSError:  # e.g. the cache folder is unreadable
        return None, "miss"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            g_p = f.get_tensor("G_p")
        ok = (
            meta.get("format") == FORMAT
            and meta.get("key") == key
            and g_p.dtype == torch.float64
            and g_p.dim() == 2
            and g_p.shape[0] == g_p.shape[1]
            and meta.get("checksum") == _checksum(g_p)
        )
        entry = PreserveEntry(g_p, int(meta["n_vectors"])) if ok else None
    except Exception:  # a truncated or garbled file: same treatment as a mismatch
        entry = None
    if entry is None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only cache: the entry is rebuilt in memory and not stored
        return None, "corrupt"
    return entry, "hit"


def save_preserve(key: str, entry: PreserveEntry, info: dict[str, str]) -> Path | None:
    """Store a preserve set atomically (temp file, then rename).

    Returns:
        The entry's path, or None when the cache cannot be written (full, read-only, a file where
        a folder should be, …): that is a ``UceWarning``, never an error — the run goes on.
    """
    path = _path(key)
    try:
        blocker = _not_a_folder(path.parent)
        if blocker is not None:
            raise NotADirectoryError(errno.ENOTDIR, "a file where a folder should be", str(blocker))
        if (path.exists() or path.is_symlink()) and (path.is_symlink() or not path.is_file()):
            kind = "a symbolic link" if path.is_symlink() else "not a file"
            raise IsADirectoryError(errno.EISDIR, kind, str(path))
        g_p = entry.G_p.detach().to("cpu", torch.float64).contiguous()
        meta = {
            "format": FORMAT,
            "key": key,
            "checksum": _checksum(g_p),
            "n_vectors": str(entry.n_vectors),
            **info,
        }
        # Serialized in memory, then written by uce's own writer: a full disk is an OSError here
        # (safetensors' save_file raises its own SafetensorError), and never through a link.
        write_file(path, save({"G_p": g_p}, meta), root=path.parent)
    except (OSError, UceError) as exc:
        if isinstance(exc, OSError):
            where = exc.filename if isinstance(exc.filename, str) else path
            reason = f"{where}: {exc.strerror or exc}"
        else:
            reason = str(exc)
        warnings.warn(
            f"preserve statistics not cached ({reason}) — the run goes on; "
            f"the next run encodes the preserve prompts again (set {CACHE_ENV} to a writable "
            "folder, or pass --no-cache)",
            UceWarning,
            stacklevel=2,
        )
        return None
    return path


def _not_a_folder(folder: Path) -> Path | None:
    """The first existing one of ``folder`` and its parents, if it is not a folder."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None
