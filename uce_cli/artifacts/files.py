"""Reading tensor files safely: safetensors with clear errors, pickle only when allowed, finite values, and the base hashes.

Safetensors metadata is a string → string map and is only ever read as data. Pickle files run code
when unpickled, so they are refused unless the user passes ``--allow-pickle``, and even then are
read with ``torch.load(weights_only=True)``, which restores tensors and plain containers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from uce_cli.artifacts.outputs import digest_of, tensor_digests
from uce_cli.errors import EditFileError  # noqa: F401 - re-exported for the formats
from uce_cli.weights.files import (  # noqa: F401 - the pickle rules, re-exported for the formats
    PICKLE_SUFFIXES,
    index_shards,
    is_pickle,
    load_pickle,
    read_header,
    refuse_pickle,
    weight_files,
)

if TYPE_CHECKING:
    from uce_cli.families.base import Family
    from uce_cli.families.model import BaseModelFiles


def read_metadata(path: Path) -> tuple[list[str], dict[str, str]]:
    """(keys, metadata) of a safetensors file from its header only.

    Raises:
        EditFileError: the file is missing or its header is corrupt.
    """
    if not path.is_file():
        raise EditFileError(f"{path}: no such file — check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError on a bad header, OSError on unreadable files
        raise EditFileError(
            f"cannot read {path}: {exc} — the file is corrupt or not safetensors"
        ) from None


def read_tensors(
    path: Path, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors (or, when allowed, pickle) file.

    Raises:
        EditFileError: missing, corrupt (header or data), or a refused pickle.
    """
    refuse_pickle(path, allow_pickle)
    if is_pickle(path):
        if not path.is_file():
            raise EditFileError(f"{path}: no such file — check the path")
        return load_pickle(path), {}
    keys, metadata = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}, metadata
    except Exception as exc:  # truncated data section
        raise EditFileError(f"cannot read tensors of {path}: {exc} — the file is corrupt") from None


def text_encoder_weights_sha256(root: Path, family: Family | None = None) -> str:
    """The identity of a pipeline's text encoders: sha256 over their tensors' names, dtypes, shapes and bytes.

    Names are taken without transformers' optional ``text_model.`` prefix and ``position_ids`` buffers
    are skipped, so the same weights hash the same whichever library version saved them, while any
    change of a weight (or of its dtype) changes the hash. Every ``text_encoder*`` folder counts
    (SDXL, FLUX and SD 3 have several); the names of the second and later ones carry their folder,
    so a one-encoder pipeline hashes as it always did. Where the family's text path continues
    inside the denoiser (``family.text_tensor_prefixes``: PixArt's caption projection), those
    tensors join, named ``<denoiser>.<key>``: the vectors the edit is built on depend on them too.
    """
    folders = sorted(p for p in root.glob("text_encoder*") if p.is_dir()) or [root / "text_encoder"]
    parts: dict[str, str] = {}  # canonical name → "dtype|shape|sha256(bytes)"
    for folder in folders:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = index_shards(index)
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise EditFileError(
                f"{folder} has no safetensors weights to identify the text encoder by"
            )
        prefix = "" if folder.name == "text_encoder" else f"{folder.name}/"
        for file in files:
            try:
                digests = tensor_digests(file)
            except (OSError, ValueError, KeyError) as exc:
                raise EditFileError(f"cannot read {file}: {exc} — the file is corrupt") from None
            for key, description in digests.items():
                if not key.endswith("position_ids"):
                    parts[prefix + key.removeprefix("text_model.")] = description
    if family is not None and family.text_tensor_prefixes:
        for file in weight_files(root / family.denoiser, "diffusion_pytorch_model"):
            keys, _ = read_header(file)
            wanted = {k for k in keys if k.startswith(family.text_tensor_prefixes)}
            for key, description in tensor_digests(file, wanted).items():
                parts[f"{family.denoiser}.{key}"] = description
    return digest_of(parts)


def kv_weights_sha256(model: BaseModelFiles, keys: list[str]) -> str:
    """Content hash of a base's cross-attention k/v tensors ``keys`` (names, dtypes, shapes, bytes).

    Deltas and LoRAs record it as ``base_kv_weights_sha256``: ``uce merge`` compares it with the
    target's to tell whether the edit was made for that base.
    """
    parts: dict[str, str] = {}
    wanted = set(keys)
    for path in model.denoiser_files:
        parts.update(tensor_digests(path, wanted))
    return digest_of(parts)


def kv_files(model: BaseModelFiles) -> dict[str, str]:
    """k/v key → the file it is stored in (for messages that name a tensor's file)."""
    return {t.key: str(t.file) for t in model.kv}


def check_finite(tensors: dict[str, torch.Tensor], source: Path | str, what: str) -> None:
    """Refuse an edit file whose tensors hold NaN/inf, naming the first one.

    Args:
        tensors: name → tensor as read.
        source: the file they came from.
        what: what the tensors are (``delta tensor``, ``LoRA factor``, ``operator``).

    Raises:
        EditFileError: naming the file, the tensor and the count.
    """
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        # NaN/inf propagate through a sum: one pass in the common case, then an exact count
        if not bool(torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32)))):
            n = int((~torch.isfinite(t)).sum())
            if n:
                raise EditFileError(
                    f"{source}: {what} '{name}' has {n} non-finite values (NaN/inf) of "
                    f"{t.numel()} — the file is corrupt or holds a diverged edit; refusing to use it"
                )
