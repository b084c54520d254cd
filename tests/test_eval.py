"""uce eval, text side: figures match a direct computation, behave as defined, --check, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import apply_recipe
from uce_cli.cli import app
from uce_cli.edit.recipe import parse_recipe
from uce_cli.errors import RecipeError

runner = CliRunner()

CSV = """prompt,artist,type
Image in the style of Kelly Mckernan,Kelly Mckernan,erased
Art inspired by Thomas Kinkade,Thomas Kinkade,erased
Image in the style of Claude Monet,Claude Monet,preserved
a cat on a sofa,,other
a red bus in the rain,,other
"""


def _body(mode: str = "paper", expect: str = "") -> str:
    return f"""alignment: {mode}
erase:
  - concepts: [Kelly Mckernan, Thomas Kinkade]
    templates: art
preserve:
  - concepts: [Claude Monet, Rembrandt]
evaluate:
  heldout:
    - {{file: prompts.csv, concept_column: artist, where: {{type: erased}}}}
  preserved:
    - {{file: prompts.csv, concept_column: artist, where: {{type: preserved}}}}
  unrelated:
    - {{file: prompts.csv, where: {{type: other}}}}
{expect}"""


def _run(tiny_model: Path, folder: Path, **kw: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.csv").write_text(CSV)
    return apply_recipe(tiny_model, folder, body=_body(**kw))


def eval_cli(*args: str):  # noqa: ANN201
    return runner.invoke(app, ["eval", *map(str, args), "-q", "--no-plots"])


def test_text_figures_match_a_direct_computation(tiny_model: Path) -> None:
    from uce_cli.families.model import open_model, open_text_path
    from uce_cli.judge.text import DriftPrompt, HeldOutPrompt, TextInputs, text_figures

    base = open_model(str(tiny_model))
    text_path = open_text_path(base, torch.device("cpu"), torch.float32)
    tok, enc = text_path.tokenizer, text_path.encoder
    torch.manual_seed(0)
    key = base.kv[0].key
    w_old = {key: base.read_kv([key])[key].float()}
    w_new = {key: w_old[key] + 0.05 * torch.randn_like(w_old[key])}
    held = HeldOutPrompt("art by Kelly Mckernan", "Kelly Mckernan", "art")
    inputs = TextInputs([held], [DriftPrompt("a cat", "cat")], [DriftPrompt("a bus", "bus")])
    got = text_figures(inputs, text_path, w_old, w_new)

    def hidden(p: str) -> torch.Tensor:
        ids = tok([p], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return enc(ids)[0][0].detach()

    n_s = len(tok("art by Kelly Mckernan").input_ids)
    n_t = len(tok("art").input_ids)
    f_s, f_t = n_s - 2, n_t - 2
    k = 77 - max(f_s, f_t)
    c_s, c_t = hidden(held.prompt)[f_s : f_s + k], hidden("art")[f_t : f_t + k]
    old, new = w_old[key], w_new[key]
    before = (c_s @ old.T - c_t @ old.T).norm()
    after = (c_s @ new.T - c_t @ old.T).norm()
    assert got["figures"]["efficacy"] == pytest.approx((1 - after / before).item(), rel=1e-4)
    b_eos = (c_s[1] @ old.T - c_t[1] @ old.T).norm()
    a_eos = (c_s[1] @ new.T - c_t[1] @ old.T).norm()
    assert got["figures"]["leakage_eos"] == pytest.approx((a_eos / b_eos).item(), rel=1e-4)
    x = hidden("a bus")
    drift = ((x @ (new - old).T).norm() / (x @ old.T).norm()).item()
    assert got["figures"]["drift_unrelated"] == pytest.approx(drift, rel=1e-4)
    assert got["layers"][key]["efficacy"] == pytest.approx(got["figures"]["efficacy"])


def test_eval_on_a_paper_edit_and_last_token_leaks_more(tiny_model: Path, tmp_path: Path) -> None:
    paper = _run(tiny_model, tmp_path / "paper")
    result = eval_cli(paper)
    assert result.exit_code == 0, result.stderr
    report = json.loads((paper / "eval" / "eval.json").read_text())
    assert report["schema"] == 1
    figures = report["figures"]
    assert 0 < figures["efficacy"] <= 1
    assert figures["drift_preserve"] >= 0 and figures["drift_unrelated"] >= 0
    assert set(report["text"]["concepts"]["edited"]) == {"Kelly Mckernan", "Thomas Kinkade"}
    assert report["text"]["counts"]["heldout_prompts"] == 2
    assert len(report["text"]["layers"]) == 14
    md = (paper / "eval" / "eval.md").read_text()
    assert "| `efficacy` |" in md and "Per layer" in md

    last = _run(tiny_model, tmp_path / "last", mode="last-token")
    assert eval_cli(last).exit_code == 0
    last_fig = json.loads((last / "eval" / "eval.json").read_text())["figures"]
    # last-token edits only the last word token: the EOS and padding positions keep the concept
    assert last_fig["leakage_eos"] > figures["leakage_eos"]
    assert last_fig["leakage_pad"] > figures["leakage_pad"]


def test_eval_check_fails_on_an_impossible_expectation_and_passes_on_a_met_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    impossible = """  expect:
    - {metric: efficacy, value: 5.0, tolerance: 0.1, source: "test"}
    - {metric: drift_unrelated, value: 0.0, tolerance: 10.0, source: "test"}
"""
    run = _run(tiny_model, tmp_path / "a", expect=impossible)
    result = eval_cli(run, "--check")
    assert result.exit_code == 1
    assert "1 figure(s) out of tolerance: efficacy = " in result.stderr
    assert "expected 5 ± 0.1, test" in result.stderr
    assert "drift_unrelated" not in result.stderr
    # an existing report is checked as it is, without recomputing
    assert eval_cli(run, "--check").exit_code == 1

    met = """  expect:
    - {metric: efficacy, value: 0.5, tolerance: 0.5, source: "test"}
"""
    run = _run(tiny_model, tmp_path / "b", expect=met)
    result = eval_cli(run, "--check")
    assert result.exit_code == 0, result.stderr


def test_existing_report_needs_force(erased_model: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(erased_model, run)
    assert eval_cli(run).exit_code == 0
    again = eval_cli(run)
    assert again.exit_code == 1 and "pass --force" in again.stderr
    assert eval_cli(run, "--force").exit_code == 0


def test_show_displays_the_eval(erased_model: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(erased_model, run)
    before = runner.invoke(app, ["show", str(run)])
    assert "efficacy" not in before.stdout
    assert eval_cli(run).exit_code == 0
    shown = runner.invoke(app, ["show", str(run)])
    assert shown.exit_code == 0
    assert "efficacy" in shown.stdout and "drift_unrelated" in shown.stdout


def test_eval_bad_input(tiny_model: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    result = eval_cli(plain)
    assert result.exit_code == 1 and "no edit log here" in result.stderr
    assert "Traceback" not in result.stderr

    folder = tmp_path / "badcol"
    folder.mkdir()
    (folder / "prompts.csv").write_text("text,artist\nx,Kelly Mckernan\n")
    run = apply_recipe(tiny_model, folder, body=_body())
    result = eval_cli(run)
    assert result.exit_code == 1
    assert "evaluate.heldout.0: prompts.csv has no column 'prompt', 'type'" in result.stderr


def test_expect_naming_an_unknown_metric_is_a_recipe_error() -> None:
    data = {
        "model": "builtin:tiny-sd",
        "erase": [{"concepts": ["x"]}],
        "evaluate": {"expect": [{"metric": "eficacy", "value": 1, "tolerance": 0, "source": "T1"}]},
    }
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data, "r.yaml")
    assert (
        "r.yaml: evaluate.expect.0.metric: unknown figure 'eficacy' — did you mean `efficacy`?"
        in str(exc.value)
    )
    data["evaluate"] = {
        "expect": [{"metric": "lpips", "value": 0.1, "tolerance": 0.1, "source": "T1"}]
    }
    with pytest.raises(RecipeError, match="metric `lpips` is not in `metrics`"):
        parse_recipe(data, "r.yaml")


def test_a_run_with_an_eval_folder_still_samples_as_an_edit(
    erased_model: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(erased_model, run)
    (run / "edit.safetensors").unlink()  # sample reads the folder itself, eval/ included
    assert eval_cli(run).exit_code == 0
    sampled = runner.invoke(
        app,
        ["sample", "--edit", str(run), "--prompt", "a cat", "--steps", "1",
         "--out", str(tmp_path / "s"), "-q"],
    )  # fmt: skip
    assert sampled.exit_code == 0, sampled.stderr


def test_expectations_added_to_the_recipe_after_the_edit_are_checked(
    tiny_model: Path, tmp_path: Path
) -> None:
    run = _run(tiny_model, tmp_path / "a")
    empty = eval_cli(run, "--check")  # no expect: yet: a gate with nothing to check fails
    assert empty.exit_code == 1 and "has no expect: entries" in empty.stderr
    assert "--allow-empty" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1
    assert eval_cli(run, "--check", "--allow-empty").exit_code == 0
    recipe = tmp_path / "a" / "recipe.yaml"
    recipe.write_text(
        recipe.read_text()
        + "  expect:\n    - {metric: efficacy, value: -3.0, tolerance: 0.5, source: Table 9}\n"
    )
    result = eval_cli(run, "--check")
    assert result.exit_code == 1 and "efficacy" in result.stderr and "Table 9" in result.stderr
    # a recipe that now describes another edit is not used: the log's copy is
    recipe.write_text(recipe.read_text().replace("Rembrandt", "Vermeer"))
    assert eval_cli(run, "--check", "--allow-empty").exit_code == 0


def test_plots_without_matplotlib_name_the_extra(
    erased_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import sys

    run = tmp_path / "run"
    shutil.copytree(erased_model, run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(app, ["eval", str(run), "-q"])
    assert result.exit_code == 1
    assert (
        'plots need matplotlib — pip install "uce-cli[eval]", or pass --no-plots' in result.stderr
    )
    assert runner.invoke(app, ["eval", str(run), "-q", "--no-plots"]).exit_code == 0
