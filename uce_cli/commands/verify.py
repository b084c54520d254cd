"""``uce verify`` as a library call: compare two edits tensor by tensor (relative Frobenius error).

Either side may be any edit format, a diffusers folder, a single file or a hub model. LoRAs and
operators are relative to a base and need one; with a base, a side that holds only some k/v
tensors (a delta, a LoRA, an operator of ``to_k`` only) is completed from the base, so untouched
tensors are compared too, and each error is also given relative to the edit's own size ‖ΔW‖.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uce_cli.artifacts.formats import EditFileError, edit_weights, load_edit
from uce_cli.families.model import open_model


@dataclass(frozen=True)
class TensorDiff:
    """One tensor compared: ‖A − B‖_F / ‖B‖_F, and / ‖B − W_base‖_F when a base is known."""

    key: str
    shape: tuple[int, ...]
    rel_error: float
    rel_to_edit: float | None
    ok: bool


@dataclass
class Comparison:
    """The result of comparing an edit with a reference."""

    rtol: float
    rows: list[TensorDiff] = field(default_factory=list)
    only_edit: list[str] = field(default_factory=list)
    only_reference: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TensorDiff]:
        """Tensors beyond the tolerance."""
        return [r for r in self.rows if not r.ok]

    @property
    def worst(self) -> TensorDiff:
        """The tensor with the largest relative error."""
        return max(self.rows, key=lambda r: r.rel_error)


def _rel(num: torch.Tensor, den: torch.Tensor) -> float:
    """‖num‖ / ‖den‖; infinite when either holds NaN/inf (so such a tensor fails and is the worst)."""
    d = float(den.norm())
    n = float(num.norm())
    if not (math.isfinite(n) and math.isfinite(d)):
        return float("inf")
    return n / d if d > 0 else (0.0 if n == 0 else float("inf"))


def compare_edits(
    edit: Path | str,
    reference: Path | str,
    rtol: float = 1e-3,
    base: str | None = None,
    allow_pickle: bool = False,
) -> Comparison:
    """Compare two edits' k/v weights; every common tensor is one row.

    Args:
        edit: the edit to check (any format, a model folder, a single file, a hub id).
        reference: what it should equal (same choices).
        rtol: largest accepted ‖A − B‖_F / ‖B‖_F per tensor.
        base: the base model, needed for LoRA and operator sides.
        allow_pickle: accept pickle files (``weights_only=True``).

    Raises:
        EditFileError: a side needs a base and none was given, shapes differ, or nothing in common.
    """
    if rtol < 0:
        raise EditFileError(f"--rtol {rtol}: the tolerance must be >= 0")
    sides = [load_edit(edit, allow_pickle), load_edit(reference, allow_pickle)]
    missing = next((s for s in sides if s.needs_base), None)
    if missing is not None and base is None:
        raise EditFileError(
            f"{missing.path} is a {missing.kind}, which is relative to a base model — pass --base MODEL"
        )
    base_model = open_model(base, allow_pickle=allow_pickle) if base else None
    weights = [edit_weights(s, base_model) for s in sides]
    base_kv: dict[str, torch.Tensor] = {}
    if base_model is not None:
        base_kv = base_model.read_kv()
        for s, w in zip(sides, weights, strict=True):
            if s.kind != "model":
                for key, value in base_kv.items():
                    w.setdefault(key, value)
    a, b = weights
    result = Comparison(rtol)
    result.only_edit = sorted(set(a) - set(b))
    result.only_reference = sorted(set(b) - set(a))
    common = [k for k in b if k in a]
    if not common:
        raise EditFileError(
            f"{edit} and {reference} share no k/v tensor — pass --base MODEL when one side is a partial edit"
        )
    for key in sorted(common, key=_order):
        wa, wb = a[key].to(torch.float64), b[key].to(torch.float64)
        if wa.shape != wb.shape:
            raise EditFileError(
                f"tensor {key}: {tuple(wa.shape)} in {edit} but {tuple(wb.shape)} in {reference}"
            )
        rel = _rel(wa - wb, wb)
        to_edit = _rel(wa - wb, wb - base_kv[key].to(torch.float64)) if key in base_kv else None
        result.rows.append(TensorDiff(key, tuple(wb.shape), rel, to_edit, rel <= rtol))
    return result


def _order(key: str) -> tuple:
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(key.split(".")[0], 3)
    return (part, [int(x) if x.isdigit() else x for x in key.split(".")])
