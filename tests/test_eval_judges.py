"""uce eval's judges and report caveats: a missing metric package skips that metric only, random
models and judges are said at the top of eval.md, builtin:tiny-clip judges, an evaluate: changed
since apply is warned and recorded, pickled judges need --allow-pickle, a non-CLIP folder is named."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests import test_eval_images
from tests.conftest import apply_recipe
from uce_cli.cli import app
from uce_cli.errors import UceError

runner = CliRunner()
CSV = test_eval_images.CSV
# the tiny CLIP and ResNet judges of test_eval_images, as fixtures of these names
clip_fixture, resnet_fixture = test_eval_images.tiny_clip, test_eval_images.tiny_resnet


def _images_run(tiny_model: Path, folder: Path, clip: Path | str, metrics: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objects.csv").write_text(CSV)
    body = f"""erase:
  - concepts: [tench]
    templates: object
evaluate:
  images:
    prompts: {{file: objects.csv, concept_column: class}}
    steps: 1
  metrics: [{metrics}]
  clip_model: {clip}
"""
    return apply_recipe(tiny_model, folder, body=body)


def _eval(*args: object):  # noqa: ANN202
    return runner.invoke(app, ["eval", *map(str, args), "-q", "--no-plots"])


def test_a_missing_metric_package_skips_that_metric_only(
    tiny_model: Path, clip_fixture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the extra were not installed
    run = _images_run(tiny_model, tmp_path / "r", clip_fixture, "clip_score, nudenet")
    result = _eval(run, "--images")
    assert result.exit_code == 0, result.stderr
    assert "warning: metric nudenet needs the `nudenet` package" in result.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert -100 <= report["figures"]["clip_score"] <= 100
    assert "nudenet_exposed" not in report["figures"]
    assert 'pip install "uce-cli[eval]"' in report["images"]["skipped"]["nudenet"]
    md = (run / "eval" / "eval.md").read_text()
    assert "Metric `nudenet` was skipped: metric nudenet needs the `nudenet` package" in md


def test_random_models_and_judges_are_said_at_the_top_and_tiny_clip_judges(
    tiny_model: Path, tmp_path: Path
) -> None:
    run = _images_run(tiny_model, tmp_path / "r", "builtin:tiny-clip", "clip_score")
    result = _eval(run, "--images")
    assert result.exit_code == 0, result.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert -100 <= report["figures"]["clip_score"] <= 100
    md = (run / "eval" / "eval.md").read_text().splitlines()
    head = "\n".join(md[:8])  # right under the title and the run line
    assert "32-wide text embedding, as uce's tiny test models with random weights do" in head
    assert "The judge `builtin:tiny-clip` (evaluate.clip_model) has random weights" in head
    assert any("random weights" in n for n in report["notices"])


def test_an_evaluate_changed_since_apply_is_warned_and_both_hashes_recorded(
    tiny_model: Path, tmp_path: Path
) -> None:
    run = _images_run(tiny_model, tmp_path / "r", "builtin:tiny-clip", "clip_score")
    assert _eval(run).exit_code == 0
    before = json.loads((run / "eval" / "eval.json").read_text())
    assert before["evaluate_sha256"] == before["logged_evaluate_sha256"]
    recipe = tmp_path / "r" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("steps: 1", "steps: 2"))
    result = _eval(run, "--force")
    assert result.exit_code == 0, result.stderr
    assert "evaluate: changed since `uce apply` — judged with the file's" in result.stderr
    after = json.loads((run / "eval" / "eval.json").read_text())
    assert after["evaluate_from"] == "recipe file"
    assert after["logged_evaluate_sha256"] == before["evaluate_sha256"]
    assert after["evaluate_sha256"] != after["logged_evaluate_sha256"]
    assert after["recipe_sha256"] == after["recipe_file_sha256_now"] == before["recipe_sha256"]
    assert "changed it since `uce apply`" in (run / "eval" / "eval.md").read_text()


def _pickled(folder: Path, tmp_path: Path) -> Path:
    """A copy of a judge folder whose weights are a pytorch_model.bin pickle."""
    from safetensors.torch import load_file

    copy = Path(shutil.copytree(folder, tmp_path / f"{folder.name}-bin"))
    torch.save(load_file(copy / "model.safetensors"), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    return copy


def test_pickled_judges_need_allow_pickle(
    tiny_model: Path, clip_fixture: Path, tmp_path: Path
) -> None:
    from uce_cli.judge.classify import ClipClassifier

    pickled = _pickled(clip_fixture, tmp_path)
    run = _images_run(tiny_model, tmp_path / "r", pickled, "clip_score")
    result = _eval(run, "--images")
    assert result.exit_code == 1
    assert f"evaluate.clip_model: {pickled / 'pytorch_model.bin'} is a pickle" in result.stderr
    assert "--allow-pickle" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _eval(run, "--images", "--allow-pickle", "--force").exit_code == 0
    with pytest.raises(UceError, match=r"debias_loop.classifier: .*pytorch_model.bin is a pickle"):
        ClipClassifier(str(pickled), torch.device("cpu"))
    assert ClipClassifier(str(pickled), torch.device("cpu"), allow_pickle=True).model is not None


def test_a_local_folder_that_is_not_clip_is_named_not_sent_to_download(
    tiny_model: Path, resnet_fixture: Path, tmp_path: Path
) -> None:
    from uce_cli.judge.classify import ClipClassifier

    run = _images_run(tiny_model, tmp_path / "r", resnet_fixture, "clip_score")
    result = _eval(run, "--images")
    assert result.exit_code == 1
    assert f"evaluate.clip_model: {resnet_fixture} holds a 'resnet' model, not a CLIP model" in (
        result.stderr
    )
    assert "hf download" not in result.stderr
    with pytest.raises(UceError, match="holds a 'resnet' model, not a CLIP model") as exc:
        ClipClassifier(str(resnet_fixture), torch.device("cpu"))
    assert "hf download" not in str(exc.value)
