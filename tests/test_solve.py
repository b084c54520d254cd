"""Correctness of the edit: parity with a plain float64 implementation of the formula, properties.

The reference below is written out from docs/design.md independently of uce's code: it tokenizes and
encodes each pair on its own (as the published reference does), sums rank-1 terms per layer and
solves ``mat1 · mat2⁻¹`` in float64.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import PlainEncoder, write_recipe
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe
from uce_cli.edit.solve import (
    Scales,
    apply_operator,
    factorize,
    layer_metrics,
    solve_edit,
    solve_layer,
    solve_operator,
)
from uce_cli.edit.stats import EditStats
from uce_cli.errors import SolveError

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def kv_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / UNET_FILE), framework="pt") as f:
        return {
            k: f.get_tensor(k)
            for k in f.keys()
            if ".attn2.to_" in k and k.endswith(("to_k.weight", "to_v.weight"))
        }


class Reference(PlainEncoder):
    """Plain float64 UCE (docs/design.md), one pair at a time, per layer."""

    def vectors(self, source: str, targets: list[tuple[str, float]], mode: str):  # noqa: ANN201
        hidden, f = self.embed([source] + [t for t, _ in targets])
        k = 77 - max(f) if mode == "paper" else 1
        c = hidden[0, f[0] : f[0] + k]
        c_star = sum(w * hidden[i + 1, f[i + 1] : f[i + 1] + k] for i, (_, w) in enumerate(targets))
        return c, c_star

    def edit(self, w_old: torch.Tensor, pairs, preserve, lam, se, sp, mode) -> torch.Tensor:  # noqa: ANN001
        w = w_old.double()
        d = w.shape[1]
        mat1, mat2 = lam * w.clone(), lam * torch.eye(d, dtype=torch.float64)
        for source, targets in pairs:
            c, c_star = self.vectors(source, targets, mode)
            for c_i, cs_i in zip(c, c_star, strict=True):  # rank-1 terms, as in the paper's sums
                mat1 += se * torch.outer(w @ cs_i, c_i)
                mat2 += se * torch.outer(c_i, c_i)
        for prompt in preserve:
            hidden, f = self.embed([prompt])
            rows = hidden[0] if mode == "paper" else hidden[0, f[0] : f[0] + 1]
            for c_j in rows:
                mat1 += sp * torch.outer(w @ c_j, c_j)
                mat2 += sp * torch.outer(c_j, c_j)
        return torch.linalg.solve(mat2.T, mat1.T).T  # mat1 · mat2⁻¹


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Reference:
    return Reference(tiny_model)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["paper", "last-token"])
def test_parity_with_float64_reference(
    mode: str, tiny_model: Path, reference: Reference, tmp_path: Path
) -> None:
    base_hash = sha(tiny_model / UNET_FILE)
    recipe = write_recipe(
        tmp_path,
        f"""
model: {tiny_model}
alignment: {mode}
erase:
  - concepts: [Kelly Mckernan, Kinkade]
    templates: ["painting by {{}}", "{{}}"]
    guide: art
moderate:
  - concepts: [nudity]
debias:
  - concepts: [doctor]
    attributes: [male, female]
    alphas: {{male: 0.3, female: 0.2}}
    alpha_scale: absolute
preserve:
  - concepts: [Claude Monet, a photo of a dog]
solver: {{lambda: 0.3, erase_scale: 0.8, preserve_scale: 0.4}}
""",
    )
    plan = plan_recipe(recipe)
    out = run_apply(plan, out=tmp_path / "out", device="cpu").out
    new = kv_weights(out)
    old = kv_weights(tiny_model)
    pairs = [(p.source, list(p.targets)) for p in plan.pairs]
    assert len(pairs) == 4 + 1 + 1
    worst = 0.0
    for key, w_old in old.items():
        expected = reference.edit(w_old, pairs, plan.preserve, 0.3, 0.8, 0.4, mode)
        worst = max(worst, rel(new[key], expected))
    assert worst < 1e-6, worst
    # only the edited tensors differ; the base is untouched; the delta holds exactly the edit
    assert sha(tiny_model / UNET_FILE) == base_hash
    base_all, out_all = load_file(str(tiny_model / UNET_FILE)), load_file(str(out / UNET_FILE))
    changed = {k for k in base_all if not torch.equal(base_all[k], out_all[k])}
    assert changed == set(old)
    delta = load_file(str(out / "edit.safetensors"))
    assert set(delta) == {f"unet.{k}" for k in old}
    assert all(torch.equal(delta[f"unet.{k}"], new[k]) for k in old)


def test_operator_equals_per_layer_solve(tiny_model: Path, reference: Reference) -> None:
    """W_old·K (one factorization) equals the general per-layer closed form."""
    torch.manual_seed(0)
    d = 32
    c_s, c_t, c_p = (
        torch.randn(40, d).double(),
        torch.randn(40, d).double(),
        torch.randn(300, d).double(),
    )
    stats = EditStats(d, c_s.T @ c_s, c_t.T @ c_s, c_t.T @ c_t, c_p.T @ c_p)
    scales = Scales(0.5, 1.0, 0.1)
    chol = factorize(stats, scales)
    k = solve_operator(stats, scales, chol)
    for d_out in (32, 64):
        w = torch.randn(d_out, d)
        per_layer = solve_layer(w, w.double() @ stats.G_ts, stats, scales, chol)
        new, _, _ = solve_edit({"w": w}, stats, scales)
        assert rel(new["w"], per_layer) < 1e-6
        assert rel(apply_operator(w, k), per_layer) < 1e-6


def test_preserve_only_statistics_leave_weights_unchanged() -> None:
    torch.manual_seed(1)
    d = 16
    c_p = torch.randn(100, d).double()
    zeros = torch.zeros(d, d, dtype=torch.float64)
    stats = EditStats(d, zeros, zeros, zeros, c_p.T @ c_p)
    w = torch.randn(24, d)
    new, k, metrics = solve_edit({"w": w}, stats, Scales(0.5, 1.0, 1.0))
    assert torch.equal(k, torch.eye(d, dtype=torch.float64))
    assert torch.allclose(new["w"], w, rtol=0, atol=1e-7)
    assert metrics["w"]["rel_delta"] < 1e-7


def test_guide_equal_to_concept_is_a_no_op(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\nerase:\n  - concepts: [Kinkade]\n    guide: Kinkade\n"
        "preserve:\n  - concepts: [Claude Monet]\n",
    )
    out = run_apply(plan_recipe(recipe), out=tmp_path / "out", device="cpu").out
    new, old = kv_weights(out), kv_weights(tiny_model)
    assert max(rel(new[k], old[k]) for k in old) < 1e-6


def test_small_lambda_hits_targets(tiny_model: Path, reference: Reference, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\nalignment: last-token\nerase:\n  - concepts: [Kelly Mckernan, Kinkade]\n"
        "    guide: [art, a photo of a dog]\nsolver: {lambda: 1.0e-7}\n",
    )
    out = run_apply(plan_recipe(recipe), out=tmp_path / "out", device="cpu").out
    new, old = kv_weights(out), kv_weights(tiny_model)
    for source, guide in [("Kelly Mckernan", "art"), ("Kinkade", "a photo of a dog")]:
        c, c_star = reference.vectors(source, [(guide, 1.0)], "last-token")
        for key, w_old in old.items():
            hit = new[key].double() @ c[0]
            target = w_old.double() @ c_star[0]
            assert rel(hit, target) < 1e-4, (key, source)


def test_erase_moves_concept_to_guide_more_than_unrelated(
    tiny_model: Path, reference: Reference, tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\nalignment: last-token\nerase:\n  - concepts: [Kelly Mckernan]\n    guide: art\n"
        "preserve:\n  - concepts: [Claude Monet, Rembrandt, a cat, a city]\n",
    )
    out = run_apply(plan_recipe(recipe), out=tmp_path / "out", device="cpu").out
    new, old = kv_weights(out), kv_weights(tiny_model)
    c, c_star = reference.vectors("Kelly Mckernan", [("art", 1.0)], "last-token")
    unrelated, _ = reference.vectors("a photo of a dog", [("a photo of a dog", 1.0)], "last-token")
    for key, w_old in old.items():
        w_new, w0 = new[key].double(), w_old.double()
        to_guide_before = (w0 @ c[0] - w0 @ c_star[0]).norm()
        to_guide_after = (w_new @ c[0] - w0 @ c_star[0]).norm()
        assert to_guide_after < 0.5 * to_guide_before, key
        concept_move = rel(w_new @ c[0], w0 @ c[0])
        unrelated_move = rel(w_new @ unrelated[0], w0 @ unrelated[0])
        assert unrelated_move < 0.5 * concept_move, key


def test_lambda_zero_singular_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"model: {tiny_model}\nalignment: last-token\nerase:\n  - concepts: [Kinkade]\nsolver: {{lambda: 0}}\n",
    )
    with pytest.raises(
        SolveError, match=r"singular: solver\.lambda is 0 .* span only 1 of 32 dimensions"
    ):
        run_apply(plan_recipe(recipe), out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging leftovers


def test_lambda_zero_full_rank_solves_exactly() -> None:
    """λ = 0 is allowed when the vectors span the space: W = W_old (s_e G_ts + s_p G_p) M⁻¹."""
    torch.manual_seed(2)
    d = 16
    c_s, c_t, c_p = (
        torch.randn(3, d).double(),
        torch.randn(3, d).double(),
        torch.randn(50, d).double(),
    )
    stats = EditStats(d, c_s.T @ c_s, c_t.T @ c_s, c_t.T @ c_t, c_p.T @ c_p)
    w = torch.randn(8, d).double()
    new, _, _ = solve_edit({"w": w}, stats, Scales(0.0, 1.0, 0.5))
    m = stats.G_s + 0.5 * stats.G_p
    expected = (w @ stats.G_ts + 0.5 * w @ stats.G_p) @ torch.linalg.inv(m)
    assert rel(new["w"], expected) < 1e-10


def test_operator_metrics_match_direct_computation() -> None:
    """The trace-form figures equal the same figures computed from explicit vectors."""
    torch.manual_seed(3)
    d = 24
    c_s, c_t, c_p = (
        torch.randn(30, d).double(),
        torch.randn(30, d).double(),
        torch.randn(90, d).double(),
    )
    stats = EditStats(d, c_s.T @ c_s, c_t.T @ c_s, c_t.T @ c_t, c_p.T @ c_p)
    w = torch.randn(40, d).double()
    new, _, metrics = solve_edit({"w": w}, stats, Scales(0.5, 1.0, 0.3))
    w1 = new["w"]
    v_star = w @ c_t.T
    expected = {
        "rel_delta": float((w1 - w).norm() / w.norm()),
        "residual_before": float((w @ c_s.T - v_star).norm() / v_star.norm()),
        "residual_after": float((w1 @ c_s.T - v_star).norm() / v_star.norm()),
        "preserve_drift": float(((w1 - w) @ c_p.T).norm() / (w @ c_p.T).norm()),
    }
    for name, value in expected.items():
        assert metrics["w"][name] == pytest.approx(value, rel=1e-8), name
    assert layer_metrics(w, w1, stats) == pytest.approx(metrics["w"], rel=1e-8)


def test_apply_and_figures_precision_by_weight_dtype() -> None:
    """K applies in float32 to ≤32-bit weights (within 1e-6 of float64), in float64 to float64 ones."""
    torch.manual_seed(4)
    d = 64
    c_s, c_t, c_p = (torch.randn(n, d).double() for n in (80, 80, 200))
    stats = EditStats(d, c_s.T @ c_s, c_t.T @ c_s, c_t.T @ c_t, c_p.T @ c_p)
    scales = Scales(0.5, 1.0, 0.2)
    w = torch.randn(96, d)
    new32, k, metrics32 = solve_edit({"w": w}, stats, scales)
    exact = w.double() @ k
    assert new32["w"].dtype == torch.float32 and rel(new32["w"], exact) < 1e-6
    new64, _, _ = solve_edit({"w": w.double()}, stats, scales)
    assert rel(new64["w"], exact) < 1e-13
    new16, _, _ = solve_edit({"w": w.half()}, stats, scales)
    assert new16["w"].dtype == torch.float16 and rel(new16["w"], exact) < 1e-3
    reference = layer_metrics(w.double(), exact, stats)  # float64 throughout
    assert metrics32["w"] == pytest.approx(reference, rel=1e-6)
