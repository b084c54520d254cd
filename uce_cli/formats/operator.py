"""The edit operator: K (d_in × d_in, float64) with W_new = W_old·K for every edited k/v layer.

K depends only on text embeddings (docs/design.md), so it re-applies exactly to any checkpoint that
shares the text encoder it was computed with (SD 1.4 → SD 1.5 and fine-tunes of them). The file
names that encoder by ``text_encoder_weights_sha256`` and is refused for any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from uce_cli.formats.files import (
    EditFileError,
    check_finite,
    kv_files,
    read_tensors,
    text_encoder_weights_sha256,
)
from uce_cli.model import BaseModelFiles
from uce_cli.solve import apply_operator, check_base_weights, check_result
from uce_cli.tensorfile import SavedFile, save_tensors

OPERATOR_FILE = "operator.safetensors"
OPERATOR_FORMAT = "uce-operator"


@dataclass(frozen=True)
class Operator:
    """An edit operator read from disk."""

    k: torch.Tensor  # (d_in, d_in) float64
    projections: list[str]  # e.g. ["to_k", "to_v"]
    metadata: dict[str, str]


def write_operator(
    path: Path, k: torch.Tensor, projections: list[str], metadata: dict[str, str]
) -> SavedFile:
    """Write K (float64) and its metadata (text encoder hash, recipe hash, alignment, width, projections)."""
    meta = {
        **metadata,
        "format": OPERATOR_FORMAT,
        "width": str(k.shape[0]),
        "projections": ",".join(projections),
    }
    return save_tensors({"K": k.detach().to("cpu", torch.float64)}, path, meta)


def read_operator(path: Path, allow_pickle: bool = False) -> Operator:
    """Read and check an operator file.

    Raises:
        EditFileError: no ``K`` tensor, not square, not finite, or projections missing.
    """
    tensors, meta = read_tensors(path, allow_pickle)
    k = tensors.get("K")
    if k is None or k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise EditFileError(f"{path}: no square tensor 'K' — not a uce operator file")
    check_finite({"K": k}, path, "operator")
    projections = [p for p in meta.get("projections", "to_k,to_v").split(",") if p]
    bad = [p for p in projections if p not in ("to_k", "to_v")]
    if bad:
        raise EditFileError(
            f"{path}: metadata field 'projections' names {bad[0]!r} — expected to_k and/or to_v"
        )
    return Operator(k.to(torch.float64), projections, meta)


def check_operator_base(op: Operator, base: BaseModelFiles, source: Path) -> None:
    """Refuse a base whose text encoder or embedding width differs from the operator's.

    Raises:
        EditFileError: naming the field that differs and what it should be.
    """
    if base.width != op.k.shape[0]:
        raise EditFileError(
            f"{source}: the operator is {op.k.shape[0]}×{op.k.shape[0]} but {base.spec}'s cross-attention "
            f"layers read {base.width}-wide embeddings — a different model family"
        )
    expected = op.metadata.get("text_encoder_weights_sha256")
    if not expected:
        raise EditFileError(
            f"{source}: metadata field 'text_encoder_weights_sha256' is missing — cannot tell which text encoder K belongs to"
        )
    actual = text_encoder_weights_sha256(base.root)
    if actual != expected:
        raise EditFileError(
            f"{source}: text_encoder_weights_sha256 {expected[:12]}… does not match {base.spec}'s text encoder "
            f"({actual[:12]}…) — an operator only transfers between models that share the text encoder"
        )


def operator_weights(op: Operator, base: BaseModelFiles) -> dict[str, torch.Tensor]:
    """W_new = W_old·K for every k/v layer of the base whose projection the operator edits.

    Raises:
        ModelError: a base weight holds NaN/inf.
        SolveError: a result holds NaN/inf (it overflows the weight dtype).
    """
    keys = [t.key for t in base.kv if t.key.split(".")[-2] in op.projections]
    old = base.read_kv(keys)
    check_base_weights(old, kv_files(base))
    new = {key: apply_operator(w, op.k) for key, w in old.items()}
    for key, w in new.items():
        check_result(f"{base.denoiser}.{key}", w)
    return new
