"""The edit operator: one K per group (d_in × d_in, float64), W_new = W_old·K for every edited layer
that reads that group's embedding.

K depends only on text embeddings (docs/design.md), so it re-applies exactly to any checkpoint that
shares the text encoder it was computed with (SD 1.4 → SD 1.5 and fine-tunes of them). The file
names that encoder by ``text_encoder_weights_sha256`` and is refused for any other, and names its
family: a base of another family is refused naming both.

Layout: a one-group family's file holds one tensor ``K`` (the layout of uce's first operator files,
still read as such); a family with several groups stores ``K.<group>`` per group and lists them in
the ``groups`` metadata field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from uce_cli.artifacts.files import (
    EditFileError,
    check_finite,
    kv_files,
    read_tensors,
    text_encoder_weights_sha256,
)
from uce_cli.edit.solve import apply_operator, check_base_weights, check_result
from uce_cli.families.model import BaseModelFiles
from uce_cli.weights.tensorfile import SavedFile, save_tensors

OPERATOR_FILE = "operator.safetensors"
OPERATOR_FORMAT = "uce-operator"
# Operators written before families were recorded are SD 1.x/2.x ones (all uce edited then).
LEGACY_FAMILIES = ("sd1", "sd2")


@dataclass(frozen=True)
class Operator:
    """An edit operator read from disk: one K per group."""

    ks: dict[str, torch.Tensor]  # group → (d_in, d_in) float64
    projections: list[str]  # e.g. ["to_k", "to_v"]
    metadata: dict[str, str]

    @property
    def k(self) -> torch.Tensor:
        """The K of a one-group operator."""
        if len(self.ks) != 1:
            raise EditFileError(f"the operator has {len(self.ks)} groups ({', '.join(self.ks)})")
        return next(iter(self.ks.values()))

    @property
    def family(self) -> str | None:
        """The family name the operator was made for (None: an operator from before families)."""
        return self.metadata.get("family") or None


def operator_tensors(ks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors: ``K`` for one group, ``K.<group>`` for several."""
    if len(ks) == 1:
        return {"K": next(iter(ks.values())).detach().to("cpu", torch.float64)}
    return {f"K.{g}": k.detach().to("cpu", torch.float64) for g, k in ks.items()}


def write_operator(
    path: Path,
    ks: dict[str, torch.Tensor] | torch.Tensor,
    projections: list[str],
    metadata: dict[str, str],
) -> SavedFile:
    """Write each group's K (float64) and the metadata (text encoder hash, recipe hash, alignment,
    width, projections; groups when there are several)."""
    if isinstance(ks, torch.Tensor):
        ks = {"text": ks}
    meta = {
        **metadata,
        "format": OPERATOR_FORMAT,
        "width": ",".join(str(k.shape[0]) for k in ks.values()),
        "projections": ",".join(projections),
    }
    if len(ks) > 1:
        meta["groups"] = ",".join(ks)
    return save_tensors(operator_tensors(ks), path, meta)


def read_operator(path: Path, allow_pickle: bool = False) -> Operator:
    """Read and check an operator file.

    Raises:
        EditFileError: no ``K`` tensor (or one per listed group), not square, not finite, or
            projections missing.
    """
    tensors, meta = read_tensors(path, allow_pickle)
    groups = [g for g in meta.get("groups", "").split(",") if g]
    names = {f"K.{g}": g for g in groups} if groups else {"K": meta.get("group", "text")}
    ks: dict[str, torch.Tensor] = {}
    for name, group in names.items():
        k = tensors.get(name)
        if k is None or k.dim() != 2 or k.shape[0] != k.shape[1]:
            raise EditFileError(f"{path}: no square tensor '{name}' — not a uce operator file")
        check_finite({name: k}, path, "operator")
        ks[group] = k.to(torch.float64)
    projections = [p for p in meta.get("projections", "to_k,to_v").split(",") if p]
    if not projections:
        raise EditFileError(f"{path}: metadata field 'projections' is empty")
    return Operator(ks, projections, meta)


def check_operator_base(op: Operator, base: BaseModelFiles, source: Path) -> None:
    """Refuse a base of another family, or whose text encoder or embedding widths differ.

    Raises:
        EditFileError: naming the field that differs and what it should be.
    """
    assert base.family is not None
    made_for = op.family
    if (
        made_for is not None
        and made_for != base.family.name
        or (made_for is None and base.family.name not in LEGACY_FAMILIES)
    ):
        raise EditFileError(
            f"{source}: the operator was made for a {made_for or 'Stable Diffusion 1.x/2.x'} model "
            f"but {base.spec} is {base.family.label} ({base.family.name}) — an operator only "
            "transfers within one model family"
        )
    widths = {g.name: g.width for g in base.groups}
    for group, k in op.ks.items():
        if group not in widths:
            raise EditFileError(
                f"{source}: the operator edits the group '{group}', which {base.spec} does not "
                f"have (its groups: {', '.join(widths)}) — a different model family"
            )
        if widths[group] != k.shape[0]:
            raise EditFileError(
                f"{source}: the operator is {k.shape[0]}×{k.shape[0]} but {base.spec}'s cross-attention "
                f"layers read {widths[group]}-wide embeddings — a different model family"
            )
    known = {t.projection for t in base.kv}
    bad = [p for p in op.projections if p not in known]
    if bad:
        raise EditFileError(
            f"{source}: metadata field 'projections' names {bad[0]!r} — expected "
            f"{' and/or '.join(sorted(known))}"
        )
    expected = op.metadata.get("text_encoder_weights_sha256")
    if not expected:
        raise EditFileError(
            f"{source}: metadata field 'text_encoder_weights_sha256' is missing — cannot tell which text encoder K belongs to"
        )
    actual = text_encoder_weights_sha256(base.root, base.family)
    if actual != expected:
        raise EditFileError(
            f"{source}: text_encoder_weights_sha256 {expected[:12]}… does not match {base.spec}'s text encoder "
            f"({actual[:12]}…) — an operator only transfers between models that share the text encoder"
        )


def operator_weights(op: Operator, base: BaseModelFiles) -> dict[str, torch.Tensor]:
    """W_new = W_old·K_group for every editable layer of the base whose projection the operator edits.

    Raises:
        ModelError: a base weight holds NaN/inf.
        SolveError: a result holds NaN/inf (it overflows the weight dtype).
    """
    tensors = [t for t in base.kv if t.projection in op.projections and t.group in op.ks]
    old = base.read_kv([t.key for t in tensors])
    check_base_weights(old, kv_files(base))
    new = {
        t.key: t.whole(old[t.key], apply_operator(t.part(old[t.key]), op.ks[t.group]))
        for t in tensors
    }
    for key, w in new.items():
        check_result(f"{base.denoiser}.{key}", w)
    return new
