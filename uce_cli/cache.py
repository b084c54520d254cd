"""On-disk cache of preserve statistics: the float64 Gram matrix of a preserve set, encoded once.

A second ``uce apply`` with the same preserve set (e.g. 1,734 artists) reuses ``G_p`` instead of
re-encoding thousands of prompts. The key covers everything ``G_p`` depends on: the text
encoder's weights (sha256), its compute dtype, the alignment mode, the token length and the exact
prompt list. The stored matrix is unscaled, so the solver scales (λ, s_e, s_p) need not be part of
the key: a cached set serves every scale exactly. Entries carry a checksum of their bytes; a
corrupt or mismatched entry is detected, reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from uce_cli.paths import cache_dir

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
    """Look a preserve set up. Returns (entry or None, status: hit | miss | corrupt)."""
    path = _path(key)
    if not path.is_file():
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
        path.unlink(missing_ok=True)
        return None, "corrupt"
    return entry, "hit"


def save_preserve(key: str, entry: PreserveEntry, info: dict[str, str]) -> Path:
    """Store a preserve set atomically (temp file, then rename)."""
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    g_p = entry.G_p.detach().to("cpu", torch.float64).contiguous()
    meta = {
        "format": FORMAT,
        "key": key,
        "checksum": _checksum(g_p),
        "n_vectors": str(entry.n_vectors),
        **info,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({"G_p": g_p}, tmp, meta)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
