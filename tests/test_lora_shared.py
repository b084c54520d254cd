"""The exact LoRA of an operator edit factors K − I once per group, not each layer's ΔW."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from uce_cli.artifacts.formats import write_formats
from uce_cli.artifacts.lora import (
    LORA_FILE,
    factor_operator,
    factorize_delta,
    operator_lora_factors,
)
from uce_cli.families.model import open_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a - b).norm() / b.norm())


def low_rank_operator(d: int, r: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, r, generator=gen, dtype=torch.float64)
    b = torch.randn(r, d, generator=gen, dtype=torch.float64)
    return torch.eye(d, dtype=torch.float64) + 0.1 * a @ b


@pytest.fixture()
def svd_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records the shape of every torch.linalg.svd call."""
    shapes: list[tuple[int, ...]] = []
    real = torch.linalg.svd

    def counting(a: torch.Tensor, *args: object, **kwargs: object):  # noqa: ANN202
        shapes.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    return shapes


def test_operator_factors_are_exact_at_the_operator_rank() -> None:
    k = low_rank_operator(48, 5)
    w = torch.randn(80, 48, generator=torch.Generator().manual_seed(1))
    f = operator_lora_factors(w, factor_operator(k))
    delta = w.double() @ (k - torch.eye(48, dtype=torch.float64))
    assert f.rank == 5 and f.up.shape == (80, 5) and f.down.shape == (5, 48)
    assert f.rel_error < 1e-12
    assert rel(f.up.double() @ f.down.double(), delta) < 1e-6  # float32 storage


def test_truncated_operator_factors_match_the_per_layer_svd() -> None:
    """--lora-rank k: the same optimal rank-k approximation (and error) as ΔW's own SVD."""
    k = low_rank_operator(48, 6)
    w = torch.randn(20, 48, generator=torch.Generator().manual_seed(2))
    delta = w.double() @ (k - torch.eye(48, dtype=torch.float64))
    shared, own = operator_lora_factors(w, factor_operator(k), 3), factorize_delta(delta, 3)
    assert shared.rank == own.rank == 3
    assert abs(shared.rel_error - own.rel_error) < 1e-9
    assert abs(rel(shared.up.double() @ shared.down.double(), delta) - shared.rel_error) < 1e-6


def test_layer_narrower_than_the_operator_rank_gets_its_own_rank() -> None:
    k = low_rank_operator(48, 12)
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(3))
    f = operator_lora_factors(w, factor_operator(k))
    delta = w.double() @ (k - torch.eye(48, dtype=torch.float64))
    assert f.rank == 8 and rel(f.up.double() @ f.down.double(), delta) < 1e-6


@pytest.mark.parametrize("with_operator", [True, False])
def test_lora_of_an_operator_edit_factors_once_per_group(
    tiny_model: Path, tmp_path: Path, svd_shapes: list[tuple[int, ...]], with_operator: bool
) -> None:
    """One SVD of the d×d K − I for all layers; without an operator, one SVD per layer."""
    model = open_model(str(tiny_model))
    old = model.read_kv()
    k = low_rank_operator(32, 4)
    new = {key: (w.double() @ k).float() for key, w in old.items()}
    stage = tmp_path / "stage"
    stage.mkdir()
    meta = {"text_encoder_weights_sha256": "0" * 64}
    written = write_formats(stage, model, ["lora"], old, new, meta, k if with_operator else None)
    factors = load_file(stage / LORA_FILE)
    for key, w in old.items():
        module = f"unet.{key.removesuffix('.weight')}"
        up, down = factors[f"{module}.lora_B.weight"], factors[f"{module}.lora_A.weight"]
        delta = w.double() @ (k - torch.eye(32, dtype=torch.float64))
        assert rel(up.double() @ down.double(), delta) < 1e-5
    if with_operator:
        assert svd_shapes == [(32, 32)]  # K − I, once
        assert {m["lora_rank"] for m in written.layers.values()} == {4}
    else:
        assert len(svd_shapes) == len(old) == 14
