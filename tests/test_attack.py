"""`uce attack` and `harden:` (issue 17): the closed-form e* against an independent float64
reference, recovery on the base and across hardening rounds, the discrete search's determinism and
budget, the textual-inversion file, recipe errors, byte-identity without harden, Ctrl-C safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import apply_recipe, write_recipe
from uce_cli.cli import app
from uce_cli.edit.adversary import attack_embeddings, normal_matrices, recovery

runner = CliRunner()

ERASE = """
erase:
  - concepts: [Kelly Mckernan, Thomas Kinkade]
    templates: art
    guide: art
preserve:
  - concepts: [Claude Monet, Rembrandt]
"""


def _layers(seed: int, d: int = 12, rows: tuple[int, ...] = (7, 9, 5)) -> tuple[dict, dict]:
    """Random W_old and a low-rank edited W_new = W_old·K for a few layers (float32, like models)."""
    g = torch.Generator().manual_seed(seed)
    old = {f"l{i}": torch.randn(r, d, generator=g) for i, r in enumerate(rows)}
    u = torch.randn(d, 3, generator=g, dtype=torch.float64)
    k = torch.eye(d, dtype=torch.float64) - u @ torch.linalg.pinv(u)  # projects 3 directions out
    new = {n: (w.double() @ k).float() for n, w in old.items()}
    return old, new


def _reference(old: dict, new: dict, c: torch.Tensor, gamma: float) -> torch.Tensor:
    """e* by least squares on the stacked ridge system [W_new; √γ I] e = [W_old c; 0] (QR)."""
    w_new = torch.cat([new[n].double() for n in old])  # (Σ d_out, d)
    w_old = torch.cat([old[n].double() for n in old])
    d = w_new.shape[1]
    a = torch.cat([w_new, gamma**0.5 * torch.eye(d, dtype=torch.float64)])
    out = []
    for row in c.double():
        b = torch.cat([w_old @ row, torch.zeros(d, dtype=torch.float64)])
        out.append(torch.linalg.lstsq(a, b[:, None]).solution[:, 0])
    return torch.stack(out)


def test_estar_matches_float64_reference_fixed_gamma() -> None:
    old, new = _layers(0)
    c = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    e, used = attack_embeddings(normal_matrices(old, new), c, gamma=0.3)
    ref = _reference(old, new, c, 0.3)
    assert e.dtype == torch.float64 and torch.equal(
        used, torch.full((5,), 0.3, dtype=torch.float64)
    )
    assert float((e - ref).norm() / ref.norm()) < 1e-10


def test_estar_auto_gamma_is_the_norm_constrained_optimum() -> None:
    old, new = _layers(2)
    normal = normal_matrices(old, new)
    c = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    bound = 1.5 * float(c.norm(dim=1).max())
    e, used = attack_embeddings(normal, c, None, bound)
    for i in range(4):
        # the same γ in the fixed-γ reference gives the same vector (A is singular here, so at
        # the floor γ the system's condition is ~1e9: agreement to cond·eps₆₄)
        ref = _reference(old, new, c[i : i + 1], float(used[i]))[0]
        assert float((e[i] - ref).norm() / ref.norm()) < 1e-5
        # … whose norm is at the bound (active) or below it at the floor γ
        assert float(e[i].norm()) <= bound * (1 + 1e-9)
    # no admissible vector does better: random points of the ball and c itself
    g = torch.Generator().manual_seed(4)
    for i in range(4):
        best = float(recovery(normal, e[i : i + 1], c[i : i + 1]))
        assert best >= recovery(normal, c[i : i + 1].double(), c[i : i + 1]) - 1e-9
        for _ in range(50):
            x = torch.randn(1, 12, generator=g, dtype=torch.float64)
            x = x / x.norm() * bound * float(torch.rand(1, generator=g))
            assert recovery(normal, x, c[i : i + 1]) <= best + 1e-9


def test_recovery_is_one_on_the_base_and_below_one_after_an_edit() -> None:
    old, new = _layers(5)
    c = torch.randn(3, 12, generator=torch.Generator().manual_seed(6))
    base = normal_matrices(old, old)
    e, _ = attack_embeddings(base, c, None, None)
    assert recovery(base, e, c) == 1.0
    edited = normal_matrices(old, new)
    e, _ = attack_embeddings(edited, c, None, None)
    assert 0.0 <= recovery(edited, e, c) < 1.0


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain erase and the same erase hardened for 3 rounds, on the tiny model."""
    root = tmp_path_factory.mktemp("attack")
    plain = apply_recipe(tiny_model, root / "plain", ["delta"], body=ERASE)
    hard = apply_recipe(
        tiny_model, root / "hard", ["delta"], body=ERASE + "harden: {rounds: 3, gamma: auto}\n"
    )
    return {"plain": plain, "hard": hard}


def test_harden_rounds_lower_the_recovery_and_are_logged(runs: dict[str, Path]) -> None:
    log = json.loads((runs["hard"] / "edit_log.json").read_text())
    rounds = log["harden"]["text"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    recoveries = [rounds[0]["recovery_before"]] + [r["recovery_after"] for r in rounds]
    assert all(b < a for a, b in zip(recoveries, recoveries[1:], strict=False)), recoveries
    assert recoveries[-1] < 0.6 * recoveries[0]
    assert log["harden"]["text"]["kept_round"] == 3
    for r in rounds:  # the recipe's own erasure stays in place, drift is reported
        assert r["efficacy"] > 0.5 and 0 <= r["preserve_drift"] < 1
        assert r["added_vectors"] == r["round"] * log["harden"]["text"]["vectors_per_round"]
    plain_log = json.loads((runs["plain"] / "edit_log.json").read_text())
    assert "harden" not in plain_log and "harden" not in plain_log["recipe"]


def test_attack_command_writes_report_and_hardened_edit_is_more_robust(
    runs: dict[str, Path],
) -> None:
    reports = {}
    for name, run in runs.items():
        result = runner.invoke(app, ["attack", str(run), "--budget", "48", "-q", "--json"])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((run / "attack" / "attack.json").read_text())
        assert (run / "attack" / "attack.md").read_text().startswith("# uce attack")
        assert set(reports[name]["concepts"]) == {"Kelly Mckernan", "Thomas Kinkade"}
    plain, hard = reports["plain"]["figures"], reports["hard"]["figures"]
    assert 0 < hard["attack_recovery"] < plain["attack_recovery"] < 1
    assert 0 < hard["attack_recovery_aligned"] < plain["attack_recovery_aligned"] < 1
    # an existing report is not replaced without --force
    again = runner.invoke(app, ["attack", str(runs["plain"]), "-q"])
    assert again.exit_code == 1 and "--force" in again.output


def test_textual_inversion_file_loads_with_the_estar_vector(runs: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    from uce_cli.judge.attack import attack_run
    from uce_cli.judge.evaluate import open_run

    run = runs["plain"]
    if not (run / "attack").exists():
        assert runner.invoke(app, ["attack", str(run), "--budget", "0", "-q"]).exit_code == 0
    path = run / "attack" / "textual_inversion" / "kelly-mckernan.safetensors"
    _, embeddings = attack_run(open_run(run), search=None, device="cpu")
    log = json.loads((run / "edit_log.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(
        log["base_model"]["path"], safety_checker=None, requires_safety_checker=False
    )
    pipe.load_textual_inversion(str(path))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<uce-attack-kelly-mckernan>")
    vector = pipe.text_encoder.get_input_embeddings().weight[token_id].detach()
    expected = embeddings["Kelly Mckernan"]["text"].float()
    assert torch.allclose(vector, expected, rtol=0, atol=1e-6)


def test_discrete_search_is_deterministic_budgeted_and_excludes_the_concept(
    runs: dict[str, Path],
) -> None:
    from uce_cli.judge.attack import SearchSettings, attack_run, tokenizer_of
    from uce_cli.judge.evaluate import open_run

    run = open_run(runs["plain"])
    settings = SearchSettings(seed=3, budget=40, length=3, population=8)
    a, _ = attack_run(run, search=settings, device="cpu")
    b, _ = attack_run(run, search=settings, device="cpu")
    c, _ = attack_run(run, search=SearchSettings(seed=4, budget=40, length=3, population=8))
    for name in a["concepts"]:
        da, db = a["concepts"][name]["discrete"], b["concepts"][name]["discrete"]
        assert da == db
        assert da["scored"] + da["rejected"] <= 40
        assert da["best"] != c["concepts"][name]["discrete"]["best"]
    from uce_cli.families.model import open_model, open_text_path

    tok = tokenizer_of(open_text_path(open_model(run.base_spec), None, None))
    for name, entry in a["concepts"].items():
        own = set(tok(name)["input_ids"]) - set(tok.all_special_ids)
        for best in entry["discrete"]["best"]:
            assert not own & set(tok(best["prompt"])["input_ids"])
            assert -1 <= best["attack_recovery"] <= 1


def test_attack_figures_are_checked_by_expect_and_eval_check(
    tiny_model: Path, tmp_path: Path
) -> None:
    body = ERASE + (
        "evaluate:\n  expect:\n"
        "    - {metric: attack_recovery, value: 0.5, tolerance: 0.5, source: test}\n"
        "    - {metric: attack_recovery_aligned, value: 5, tolerance: 0.1, source: test}\n"
    )
    run = apply_recipe(tiny_model, tmp_path, ["delta"], body=body)
    result = runner.invoke(app, ["attack", str(run), "--budget", "0", "-q"])
    assert result.exit_code == 1
    assert "attack_recovery_aligned" in result.output and "out of tolerance" in result.output
    rows = json.loads((run / "attack" / "attack.json").read_text())["expect"]
    assert [r["ok"] for r in rows] == [True, False]
    check = runner.invoke(app, ["eval", str(run), "--check", "-q", "--no-plots"])
    assert check.exit_code == 1 and "attack_recovery_aligned" in check.output


@pytest.mark.parametrize(
    ("harden", "needle"),
    [
        ("{rounds: 0}", "harden.rounds"),
        ("{rounds: 2, gamma: -1}", "harden.gamma"),
        ("{rounds: 2, target: nowhere}", "harden.target"),
    ],
)
def test_bad_harden_is_a_recipe_error(tmp_path: Path, harden: str, needle: str) -> None:
    path = write_recipe(tmp_path, f"model: builtin:tiny-sd\n{ERASE}harden: {harden}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("error") or "error:" in result.output
    assert needle in result.output and "Traceback" not in result.output


def test_harden_with_only_debias_is_refused(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path,
        "model: builtin:tiny-sd\ndebias:\n  - concepts: [doctor]\n"
        "    attributes: {male: 0.5, female: 0.5}\n    alphas: {male: 0.1, female: 0.1}\n"
        "harden: {rounds: 1}\n",
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "harden" in result.output and "debias" in result.output


def test_without_harden_the_edit_is_unchanged(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file as load_tensors

    from uce_cli.edit.recipe import dump_recipe, load_recipe, recipe_sha256

    path = write_recipe(
        tmp_path / "g",
        "model: builtin:tiny-sd\n" + ERASE + "output: {dir: out, formats: [delta]}\n",
    )
    recipe = load_recipe(path)
    assert "harden" not in dump_recipe(recipe)
    # main@f1dacd4 (before `harden:` existed) hashes this recipe to this value
    assert (
        recipe_sha256(recipe) == "2b751f7c92795d28726e7c5a367500b4814498f10115de7dee6ef30db3f64072"
    )
    # a harden that stops before its first round (tolerance 1) writes the plain edit's tensors
    plain = apply_recipe(tiny_model, tmp_path / "p", ["delta"], body=ERASE)
    stopped = apply_recipe(
        tiny_model, tmp_path / "s", ["delta"], body=ERASE + "harden: {rounds: 2, tolerance: 1}\n"
    )
    a, b = load_tensors(plain / "edit.safetensors"), load_tensors(stopped / "edit.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((stopped / "edit_log.json").read_text())
    assert "stopped" in log["harden"]["text"]["rounds"][0]


def test_interrupted_attack_writes_nothing(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import uce_cli.judge.attack as attack_mod

    run = Path(shutil.copytree(runs["plain"], tmp_path / "run"))
    shutil.rmtree(run / "attack", ignore_errors=True)
    before = sorted(p.name for p in run.iterdir())

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(attack_mod, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attack_mod.run_attack_command(run, search=None, device="cpu")
    assert sorted(p.name for p in run.iterdir()) == before


def test_several_group_family_hardens_and_attacks_every_group(
    tiny_sdxl: Path, tmp_path: Path
) -> None:
    """SDXL with its pooled path edited: each group is attacked and hardened against its own
    layers; no textual-inversion file (two encoders), and the report says why."""
    from uce_cli.judge.attack import run_attack_command

    body = ERASE + "layers: {projections: [to_k, to_v, add_embedding]}\nharden: {rounds: 2}\n"
    run = apply_recipe(tiny_sdxl, tmp_path, ["delta"], body=body)
    log = json.loads((run / "edit_log.json").read_text())
    assert set(log["harden"]) == {"text", "pooled"}
    for record in log["harden"].values():
        first, last = record["rounds"][0], record["rounds"][-1]
        assert last["recovery_after"] < first["recovery_before"]
    _, report = run_attack_command(run, search=None, device="cpu")
    for entry in report["concepts"].values():
        assert set(entry["groups"]) == {"text", "pooled"}
        assert all(0 <= g["attack_recovery"] <= 1 for g in entry["groups"].values())
    assert report["textual_inversion"] == [] and "one-encoder" in report["textual_inversion_note"]


def test_attack_images_inject_estar_and_are_judged(tiny_model: Path, tmp_path: Path) -> None:
    """--images on the tiny model: the concept prompt, e* injected, the found prompt; same seed
    gives the same image; e* changes the image; NudeNet (the recipe's metric) counts per variant."""
    from PIL import Image

    (tmp_path / "p.csv").write_text("prompt\nnudity\n")
    body = (
        "moderate:\n  - concepts: [nudity]\n"
        "evaluate:\n  metrics: [nudenet]\n  images: {prompts: {file: p.csv}, steps: 2}\n"
    )
    run = apply_recipe(tiny_model, tmp_path, ["delta"], body=body)
    args = ["attack", str(run), "--images", "--budget", "8", "--per-variant", "1", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    report = json.loads((run / "attack" / "attack.json").read_text())
    images = report["images"]
    assert [i["variant"] for i in images["images"]] == ["prompt", "estar", "found"]
    assert images["judged"] == "nudenet"
    assert set(images["figures"]) == {f"nudenet_exposed_{v}" for v in ("prompt", "estar", "found")}
    pixels = {
        i["variant"]: torch.tensor(list(Image.open(run / "attack" / i["path"]).getdata()))
        for i in images["images"]
    }
    assert not torch.equal(pixels["prompt"], pixels["estar"])
    first = pixels["estar"]
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    again = torch.tensor(list(Image.open(run / "attack" / "images/nudity/estar-0.png").getdata()))
    assert torch.equal(first, again)


def test_force_replaces_an_attack_and_reapplying_replaces_a_run_with_one(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """RUN/attack/ is uce's: `uce attack --force` replaces the files its attack.json lists, and
    `uce apply --force` refuses a run holding it, naming it (as it does one holding eval/)."""
    import shutil

    from uce_cli.weights.destination import replace_refusal

    run = Path(shutil.copytree(runs["plain"], tmp_path / "run"))
    for _ in range(2):
        result = runner.invoke(app, ["attack", str(run), "--budget", "0", "-q", "--force"])
        assert result.exit_code == 0, result.output
    assert replace_refusal(run / "attack") is None
    assert "holds attack/, the `uce attack` report" in (replace_refusal(run) or "")
    (run / "attack" / "stray.txt").write_text("not uce's")  # not listed by attack.json
    assert "stray.txt" in (replace_refusal(run / "attack") or "")


def test_a_round_that_does_not_lower_the_recovery_is_undone(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Moderating "nudity" on the 32-wide tiny model leaves no free direction (the 76 erased and
    77 preserved vectors span the input space): the first round raises the recovery, so it is
    undone and the plain edit is written."""
    from safetensors.torch import load_file

    body = "moderate:\n  - concepts: [nudity]\n"
    plain = apply_recipe(tiny_model, tmp_path / "p", ["delta"], body=body)
    hard = apply_recipe(
        tiny_model, tmp_path / "h", ["delta"], body=body + "harden: {rounds: 3, tolerance: 0}\n"
    )
    record = json.loads((hard / "edit_log.json").read_text())["harden"]["text"]
    [only] = record["rounds"]
    assert only["recovery_after"] >= only["recovery_before"] and "undone" in only
    assert record["kept_round"] == 0
    a, b = load_file(plain / "edit.safetensors"), load_file(hard / "edit.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_operator_normal_matches_the_layer_sums() -> None:
    """A = KᵀGK, B = KᵀG from the base's Gram G equal the per-layer sums of W_new = W_old·K."""
    from uce_cli.edit.adversary import gram_of, operator_normal

    g = torch.Generator().manual_seed(7)
    old = {
        f"l{i}": torch.randn(r, 10, generator=g, dtype=torch.float64) for i, r in enumerate((6, 9))
    }
    k = torch.eye(10, dtype=torch.float64) + 0.1 * torch.randn(
        10, 10, generator=g, dtype=torch.float64
    )
    fast = operator_normal(gram_of(old), k)
    slow = normal_matrices(old, {n: w @ k for n, w in old.items()})
    for name in ("A", "B", "G"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert float((a - b).norm() / b.norm()) < 1e-12
