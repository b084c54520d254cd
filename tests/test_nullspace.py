"""The null-space solver, keep-exact vectors and auto-preserve (issue 18).

The float64 reference below is written from the objective, not from uce's closed form: the
minimiser of UCE's objective over updates D with D = D·P is D = s_e R P (P M P)⁺ (pseudo-inverse),
with P built from an eigendecomposition of G_p.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ERASE_RECIPE, PlainEncoder, apply_recipe, write_recipe
from uce_cli.commands.apply import run_apply
from uce_cli.edit.nullspace import NoFreeDirectionError
from uce_cli.edit.plan import plan_recipe
from uce_cli.edit.solve import Scales, solve_edit
from uce_cli.edit.stats import DebiasBlock, EditStats
from uce_cli.errors import RecipeError, SolveError

NULL_SPACE = "solver: {method: null-space}\n"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_stats(d: int = 24, n_s: int = 6, n_p: int = 12, seed: int = 0) -> EditStats:
    """Edit vectors and a preserve set spanning n_p < d directions with spread eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    c_s = torch.randn(n_s, d, generator=gen, dtype=torch.float64)
    c_t = torch.randn(n_s, d, generator=gen, dtype=torch.float64)
    scale = torch.logspace(0, -3, n_p, dtype=torch.float64).unsqueeze(1)
    c_p = scale * torch.randn(n_p, d, generator=gen, dtype=torch.float64)
    return EditStats(d, c_s.T @ c_s, c_t.T @ c_s, c_t.T @ c_t, c_p.T @ c_p, n_s, n_p)


def reference_update(
    w: torch.Tensor, r: torch.Tensor, stats: EditStats, scales: Scales, keep: torch.Tensor | None
) -> torch.Tensor:
    """W_old + s_e R P (P M P)⁺ from an eigendecomposition and a pseudo-inverse (float64)."""
    d = stats.width
    eig, vec = torch.linalg.eigh(stats.G_p)
    free = vec[:, eig < scales.null_space_threshold * eig.sum() / stats.n_preserve_vectors]
    p = free @ free.T if scales.method == "null-space" else torch.eye(d, dtype=torch.float64)
    if keep is not None:  # remove the keep-exact span from the free space
        k = p @ keep.T
        q, _ = torch.linalg.qr(k)
        p = p - q @ q.T
    m = (
        scales.lam * torch.eye(d, dtype=torch.float64)
        + scales.erase_scale * stats.G_s
        + scales.preserve_scale * stats.G_p
    )
    return w + scales.erase_scale * r @ p @ torch.linalg.pinv(p @ m @ p, hermitian=True)


@pytest.mark.parametrize("tau", [1e-1, 1e-3, 1e-6])
def test_null_space_operator_matches_float64_reference(tau: float) -> None:
    stats = random_stats()
    scales = Scales(0.5, 1.0, 0.3, "null-space", tau)
    w = torch.randn(
        40, stats.width, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    new, k, metrics = solve_edit({"w": w}, stats, scales)
    expected = reference_update(w, w @ (stats.G_ts - stats.G_s), stats, scales, None)
    assert rel(new["w"], expected) < 1e-9
    assert k is not None and rel(w @ k, expected) < 1e-9
    eig = torch.linalg.eigvalsh(stats.G_p)
    kept = int((eig < tau * eig.sum() / stats.n_preserve_vectors).sum())
    assert metrics["w"]["kept_rank"] == kept and metrics["w"]["fixed_rank_preserve"] == 24 - kept


@pytest.mark.parametrize("method", ["least-squares", "null-space"])
def test_keep_exact_update_matches_float64_reference(method: str) -> None:
    """Keep-exact vectors leave the free space: the reference projects them out with a QR."""
    stats = random_stats()
    keep = torch.randn(3, stats.width, generator=torch.Generator().manual_seed(4)).double()
    stats.keep_exact = keep
    scales = Scales(0.5, 1.0, 0.3, method, 1e-2)
    w = torch.randn(
        40, stats.width, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    new, k, metrics = solve_edit({"w": w}, stats, scales)
    expected = reference_update(w, w @ (stats.G_ts - stats.G_s), stats, scales, keep)
    assert rel(new["w"], expected) < 1e-9 and metrics["w"]["fixed_rank_keep_exact"] == 3
    moved = (keep @ (new["w"] - w).T).norm(dim=1) / (keep @ w.T).norm(dim=1)
    assert float(moved.max()) < 1e-12


def test_norm_relative_debias_per_layer_matches_reference() -> None:
    """The per-layer (no operator) null-space solve: the debias numerator, restricted."""
    stats = random_stats(n_s=0)
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(4, stats.width, generator=gen, dtype=torch.float64)
    a = torch.randn(2, 4, stats.width, generator=gen, dtype=torch.float64)
    block = DebiasBlock("doctor", c, a, (0.3, -0.2), True, c)
    stats.G_s += c.T @ c
    stats.debias.append(block)
    scales = Scales(0.5, 1.0, 0.3, "null-space", 1e-2)
    w = torch.randn(30, stats.width, generator=gen, dtype=torch.float64)
    new, k, _ = solve_edit({"w": w}, stats, scales)
    assert k is None
    from uce_cli.edit.solve import debias_numerator

    numer, _ = debias_numerator(w, [block])
    expected = reference_update(w, numer - w @ stats.G_s, stats, scales, None)
    assert rel(new["w"], expected) < 1e-9


@pytest.mark.parametrize("tau", [1e-1, 1e-2, 1e-4, 1e-6])
def test_preserved_vectors_move_at_most_the_threshold_bound(tau: float) -> None:
    """‖ΔW c_j‖ ≤ ‖ΔW‖₂·sqrt(τ)·rms‖c‖ for every preserved c_j; least squares breaks it."""
    d = 32
    gen = torch.Generator().manual_seed(5)
    c_s = torch.randn(8, d, generator=gen, dtype=torch.float64)
    c_t = torch.randn(8, d, generator=gen, dtype=torch.float64)
    c_p = torch.randn(200, d, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -4, d, dtype=torch.float64
    )  # a full-rank preserve set with a spread spectrum: no exact null space
    stats = EditStats(d, c_s.T @ c_s, c_t.T @ c_s, c_t.T @ c_t, c_p.T @ c_p, 8, 200)
    w = torch.randn(48, d, generator=gen)
    moved, logged = {}, {}
    for method in ("null-space", "least-squares"):
        new, _, metrics = solve_edit({"w": w}, stats, Scales(0.5, 1.0, 0.1, method, tau))
        dw = new["w"].double() - w.double()
        moved[method] = (c_p @ dw.T).norm(dim=1) / torch.linalg.matrix_norm(dw, 2)
        logged[method] = metrics["w"].get("preserve_bound")
    bound = (tau * float(c_p.square().sum()) / 200) ** 0.5  # sqrt(τ)·rms‖c‖
    assert logged == {"null-space": pytest.approx(bound, rel=1e-9), "least-squares": None}
    assert float(moved["null-space"].max()) <= bound * (1 + 1e-4)
    if tau <= 1e-4:  # a bound least squares does not meet
        assert float(moved["least-squares"].max()) > 1.4 * bound


def test_least_squares_is_bit_identical_to_the_plain_solve() -> None:
    """Scales with the new fields at their defaults (or named) give the previous bytes."""
    stats = random_stats()
    w = torch.randn(40, stats.width, generator=torch.Generator().manual_seed(2))
    plain, k_plain, m_plain = solve_edit({"w": w}, stats, Scales(0.5, 1.0, 0.3))
    named, k_named, m_named = solve_edit({"w": w}, stats, Scales(0.5, 1.0, 0.3, "least-squares"))
    assert torch.equal(plain["w"], named["w"]) and torch.equal(k_plain, k_named)
    assert m_plain == m_named and "kept_rank" not in m_plain


@pytest.mark.parametrize("alignment", ["paper", "last-token"])
def test_least_squares_recipe_is_bit_identical(
    tiny_model: Path, tmp_path: Path, alignment: str
) -> None:
    """The parity recipe with `method: least-squares` written out: same bytes, hash and log keys."""
    body = f"alignment: {alignment}\n{ERASE_RECIPE}output: {{formats: [delta]}}\n"
    outs = [
        apply_recipe(tiny_model, tmp_path / "implicit", body=body),
        apply_recipe(
            tiny_model, tmp_path / "explicit", body=body + "solver: {method: least-squares}\n"
        ),
    ]
    deltas = [load_file(str(o / "edit.safetensors")) for o in outs]
    assert deltas[0].keys() == deltas[1].keys()
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    logs = [json.loads((o / "edit_log.json").read_text()) for o in outs]
    assert logs[0]["solver"]["method"] == logs[1]["solver"]["method"] == "least-squares"
    assert "kept_rank" not in logs[0]["solver"] and "kept_rank" not in logs[1]["solver"]
    plain = plan_recipe(write_recipe(tmp_path / "p", f"model: {tiny_model}\n{body}"))
    assert "method" not in plain.recipe["solver"] and "auto" not in plain.recipe["preserve"][0]


def test_keep_exact_vectors_do_not_move_in_either_method(tiny_model: Path, tmp_path: Path) -> None:
    enc = PlainEncoder(tiny_model)
    hidden, _ = enc.embed([""])
    empty_last = hidden[0, :1]  # last-token mode: "" contributes its position 0 (start of text)
    sot_other, _ = enc.embed(["a painting by Thomas Kinkade"])
    for method in ("least-squares", "null-space"):
        body = (
            f"alignment: last-token\n{ERASE_RECIPE}"
            f"solver: {{method: {method}, keep_exact: [sot, empty]}}\noutput: {{formats: [delta]}}\n"
        )
        out = apply_recipe(tiny_model, tmp_path / method, body=body)
        new = load_file(str(out / "edit.safetensors"))
        from tests.test_solve import kv_weights

        for key, w in kv_weights(tiny_model).items():
            dw = new[f"unet.{key}"].double() - w.double()
            assert float(dw.norm()) > 1e-3  # the edit happened
            for x in (empty_last, sot_other[0, :1]):  # sot is the same in every prompt
                assert float((x @ dw.T).norm() / (x @ w.double().T).norm()) < 1e-5, key
        log = json.loads((out / "edit_log.json").read_text())["solver"]
        assert log["keep_exact"] == ["sot", "empty"] and log["method"] == method
        assert log["free_space"]["text"]["fixed_by_keep_exact"] == 1  # sot == "" at position 0


@pytest.mark.parametrize(
    ("solver", "cause"),
    [
        ("{method: null-space, null_space_threshold: 1e-6}", "null_space_threshold 1e-06 leaves"),
        (
            "{keep_exact: [empty]}",
            "the keep-exact vectors fix the last 32 free directions — drop solver.keep_exact$",
        ),
    ],
)
def test_no_free_direction_is_an_error_naming_the_group(
    model_copy: Path, tmp_path: Path, solver: str, cause: str
) -> None:
    """A tight threshold, or all 77 positions of "" kept exactly (paper mode), on a 32-wide model.

    The tiny encoder's final layer norm has no bias, so its outputs share an exact null direction
    that would always stay free; a bias (not summing to zero) removes it, as in a trained model.
    """
    te = model_copy / "text_encoder" / "model.safetensors"
    state = load_file(str(te))
    key = next(k for k in state if k.endswith("final_layer_norm.bias"))
    state[key] = torch.linspace(0.0, 0.5, state[key].numel())
    save_file(state, str(te), {"format": "pt"})
    body = f"{ERASE_RECIPE}solver: {solver}\n"
    with pytest.raises(NoFreeDirectionError, match=rf"^group 'text': .*32-d embeddings: {cause}"):
        apply_recipe(model_copy, tmp_path, body=body)
    from typer.testing import CliRunner

    from uce_cli.cli import app

    recipe = write_recipe(tmp_path / "cli", f"model: {model_copy}\n{body}")
    result = CliRunner().invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "cli-out")])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: group 'text': "), result.stderr
    assert not (tmp_path / "cli-out").exists()
    stats = random_stats()
    stats.G_p = torch.eye(stats.width, dtype=torch.float64)  # one eigenvalue: nothing below it
    with pytest.raises(SolveError, match="null_space_threshold 0.5 leaves no direction"):
        solve_edit({"w": torch.randn(8, stats.width)}, stats, Scales(0.5, 1, 1, "null-space", 0.5))


@pytest.mark.parametrize(
    ("solver", "message"),
    [
        ("{null_space_threshold: 0.1}", "only applies with `method: null-space`"),
        ("{method: null-space, null_space_threshold: 0}", "must be > 0"),
        ("{method: null-space, null_space_threshold: 2}", "outside 0…1"),
        ("{method: nullspace}", "solver.method"),
        ("{keep_exact: [bos]}", "solver.keep_exact"),
    ],
)
def test_bad_solver_options_are_refused(
    tiny_model: Path, tmp_path: Path, solver: str, message: str
) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_model}\n{ERASE_RECIPE}solver: {solver}\n")
    with pytest.raises(RecipeError, match=message):
        plan_recipe(recipe)


AUTO_RECIPE = """
alignment: last-token
erase:
  - concepts: [Kelly Mckernan, Thomas Kinkade]
    templates: art
preserve:
  - concepts: [Claude Monet]
  - concepts: [Rembrandt, Pablo Picasso, Vincent van Gogh, Salvador Dali, Frida Kahlo, Andy Warhol]
    auto: {top: 3}
output: {formats: [delta]}
"""


def test_auto_preserve_is_measured_reproducible_and_recorded(
    tiny_model: Path, tmp_path: Path
) -> None:
    logs, deltas = [], []
    for run in ("a", "b"):
        out = apply_recipe(tiny_model, tmp_path / run, body=AUTO_RECIPE + NULL_SPACE)
        logs.append(json.loads((out / "edit_log.json").read_text()))
        deltas.append(load_file(str(out / "edit.safetensors")))
    assert logs[0]["solver"]["auto_preserve"] == logs[1]["solver"]["auto_preserve"]
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    [auto] = logs[0]["solver"]["auto_preserve"]
    drift = auto["drift"]
    assert auto["section"] == "preserve.1" and auto["candidates"] == 6 and len(drift) == 6
    ranked = sorted(drift, key=lambda c: -drift[c])
    assert auto["chosen"] == ranked[:3] and drift[ranked[2]] > drift[ranked[3]]

    # Each candidate's drift, recomputed by hand: the plain edit (explicit preserve set only).
    plain = apply_recipe(
        tiny_model,
        tmp_path / "plain",
        body=AUTO_RECIPE.split("  - concepts: [Rembrandt")[0]
        + "output: {formats: [delta]}\n"
        + NULL_SPACE,
    )
    new = load_file(str(plain / "edit.safetensors"))
    from tests.test_solve import kv_weights

    old = kv_weights(tiny_model)
    enc = PlainEncoder(tiny_model)
    for concept in drift:
        prompts = [concept]  # templates: none
        hidden, f = enc.embed(prompts)
        x = torch.stack([hidden[i, f[i]] for i in range(len(prompts))])
        num = sum(
            float((x @ (new[f"unet.{k}"].double() - w.double()).T).square().sum())
            for k, w in old.items()
        )
        den = sum(float((x @ w.double().T).square().sum()) for w in old.values())
        assert drift[concept] == pytest.approx((num / den) ** 0.5, rel=1e-5), concept
    # The chosen concepts are preserved: under null-space their vectors no longer move.
    final = deltas[0]
    for concept in auto["chosen"]:
        hidden, f = enc.embed([concept])
        x = hidden[0, f[0]].unsqueeze(0)
        for k, w in old.items():
            dw = final[f"unet.{k}"].double() - w.double()
            assert float((x @ dw.T).norm() / (x @ w.double().T).norm()) < 1e-5
    assert logs[0]["plan"]["preserve_prompts"] == 1 + 3


def test_auto_preserve_refuses_the_debias_loop(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"""model: {tiny_model}
debias:
  - concepts: [doctor]
    attributes: {{male: 0.5, female: 0.5}}
    alphas: auto
preserve:
  - concepts: [lawyer, nurse]
    auto: {{top: 1}}
""",
    )
    with pytest.raises(RecipeError, match=r"preserve.0.auto: .*alphas: auto"):
        plan_recipe(recipe)


EDITS = {
    "erase": ERASE_RECIPE,
    "moderate": "moderate:\n  - concepts: [nudity]\npreserve:\n  - concepts: [Claude Monet]\n",
    "debias-relative": (
        "debias:\n  - concepts: [doctor]\n    attributes: {male: 0.5, female: 0.5}\n"
        "    alphas: {male: 0.3, female: -0.3}\n    alpha_scale: relative\n"
        "preserve:\n  - concepts: [lawyer]\n"
    ),
    "debias-absolute": (
        "debias:\n  - concepts: [doctor]\n    attributes: {male: 0.5, female: 0.5}\n"
        "    alphas: {male: 0.3, female: -0.3}\n    alpha_scale: absolute\n"
        "preserve:\n  - concepts: [lawyer]\n"
    ),
}


@pytest.mark.parametrize("alignment", ["paper", "last-token"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_kind_and_alignment(
    tiny_model: Path, tmp_path: Path, edit: str, alignment: str
) -> None:
    """Null-space moves the preserve set less than least squares and keeps the edit's direction."""
    # paper mode: 77 positions per preserve prompt fill the tiny model's 32 dims, so at the
    # default τ only its one exact null direction is free; a looser τ leaves room to edit
    tau = 3e-2 if alignment == "paper" else 1e-3
    figures = {}
    for method in ("least-squares", "null-space"):
        options = f", null_space_threshold: {tau}" if method == "null-space" else ""
        body = (
            f"alignment: {alignment}\n{EDITS[edit]}solver: {{method: {method}{options}}}\n"
            "output: {formats: [delta]}\n"
        )
        out = apply_recipe(tiny_model, tmp_path / method, body=body)
        layers = json.loads((out / "edit_log.json").read_text())["layers"].values()
        figures[method] = (
            max(m["preserve_drift"] for m in layers),
            sum(m["residual_after"] / m["residual_before"] for m in layers) / len(layers),
        )
    drift_ns, residual_ns = figures["null-space"]
    drift_ls, _ = figures["least-squares"]
    if alignment == "last-token":  # a few preserve vectors in 32 dims: an exact null space
        assert drift_ns < 1e-5
    else:  # 77 positions per preserve prompt fill the 32 dims: drift bounded, not zero
        assert drift_ns < drift_ls
    assert residual_ns < 0.9  # the edit still moves the edited vectors towards their targets


FAMILIES = ["tiny_model", "tiny_sdxl", "tiny_flux", "tiny_sd3", "tiny_pixart", "tiny_sana"]


@pytest.mark.parametrize("fixture", FAMILIES)
def test_every_family_keeps_preserved_vectors(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = request.getfixturevalue(fixture)
    body = (
        "alignment: last-token\nerase:\n  - concepts: [Thomas Kinkade]\npreserve:\n"
        "  - concepts: [Claude Monet, Rembrandt]\n"
        "solver: {method: null-space, null_space_threshold: 1e-6, keep_exact: [sot, empty]}\n"
        "output: {formats: [delta]}\n"
    )  # τ small: the tiny Gemma's two preserve vectors are nearly parallel (eigenvalue ratio < 1e-3)
    out = apply_recipe(model, tmp_path, body=body)
    log = json.loads((out / "edit_log.json").read_text())
    assert log["solver"]["method"] == "null-space"
    free = log["solver"]["free_space"]
    assert free and all(g["kept_rank"] > 0 and g["fixed_by_preserve"] == 2 for g in free.values())
    assert all(g["fixed_by_keep_exact"] >= 1 for g in free.values())  # sot (and "")
    layers = log["layers"].values()
    assert max(m["preserve_drift"] for m in layers) < 1e-5
    assert max(m["rel_delta"] for m in layers) > 1e-4


def test_every_format_loads_back(tiny_model: Path, tmp_path: Path) -> None:
    from uce_cli.artifacts.formats import FORMATS, edit_weights, load_edit
    from uce_cli.artifacts.lora import KOHYA_FILE, LORA_FILE
    from uce_cli.families.model import open_model

    out = apply_recipe(tiny_model, tmp_path, list(FORMATS), body=ERASE_RECIPE + NULL_SPACE)
    log = json.loads((out / "edit_log.json").read_text())
    assert log["solver"]["form"].startswith("W_new = W_old·K")  # null-space has an operator
    base = open_model(str(tiny_model))
    expected = open_model(str(out)).read_kv()
    for name in ("edit.safetensors", LORA_FILE, KOHYA_FILE, "model.safetensors",
                 "operator.safetensors"):  # fmt: skip
        got = edit_weights(load_edit(out / name), base)
        assert max(rel(got[k], w) for k, w in expected.items()) < 1e-4, name
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k], w) for k, w in expected.items())


def test_debias_loop_with_null_space(tiny_model: Path, tmp_path: Path) -> None:
    """Algorithm 1 re-solves with the null-space method; the preserved concept stays put."""
    from tests.test_debias import ScriptedJudge, _loop_recipe
    from tests.test_solve import kv_weights

    recipe = _loop_recipe(tiny_model, tmp_path, extra="alignment: last-token\n" + NULL_SPACE)
    judge = ScriptedJudge({"image of male": [3, 1, 2], "male": [2]})
    out = run_apply(
        plan_recipe(recipe), out=tmp_path / "out", device="cpu", use_cache=False, classifier=judge
    ).out
    log = json.loads((out / "edit_log.json").read_text())
    assert log["debias"]["edits"] == 2 and log["solver"]["method"] == "null-space"
    new = load_file(str(out / "edit.safetensors"))
    hidden, f = PlainEncoder(tiny_model).embed(["lawyer"])
    x = hidden[0, f[0]].unsqueeze(0)
    for key, w in kv_weights(tiny_model).items():
        dw = new[f"unet.{key}"].double() - w.double()
        assert float(dw.norm()) > 1e-6
        assert float((x @ dw.T).norm() / (x @ w.double().T).norm()) < 1e-5, key


def test_compare_script_measures_both_solvers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/compare_solvers.py on the tiny model: the rows it writes hold what the solvers do."""
    import importlib.util
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_solvers.py"
    spec = importlib.util.spec_from_file_location("compare_solvers", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    module.main(
        ["--sizes", "1,10", "--alignments", "last-token", "--preserve", "5", "--unrelated", "5",
         "--auto-top", "2", "--json", str(out), "--plot", str(tmp_path / "plot.png")]
    )  # fmt: skip
    rows = {(r["erased"], r["config"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 6 and (tmp_path / "plot.png").stat().st_size > 10_000
    for size in (1, 10):
        ls, ns = rows[size, "least-squares"], rows[size, "null-space"]
        assert ns["drift_preserve_vectors"] < 1e-6 < ls["drift_preserve_vectors"]
        assert ns["kept_rank"] == 32 - 5 and ls["kept_rank"] == 32
        assert rows[size, "null-space+auto"]["kept_rank"] == 32 - 2
    assert not list((tmp_path / "tmp").glob("uce-compare-*"))  # its work folder is gone
