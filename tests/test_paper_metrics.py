"""The paper's figures (docs/metrics.md): formulas against hand-computed values, then through the
real loaders (tiny random CLIP and ResNet saved with save_pretrained, NudeNet's bundled detector),
and one published-style recipe on builtin:tiny-sd through `uce eval --images --check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import apply_recipe
from tests.test_eval_images import tiny_clip, tiny_resnet  # noqa: F401 (fixtures)
from uce_cli.cli import app
from uce_cli.judge.metrics import (
    attribute_deviation,
    attribute_deviation_metric,
    class_reductions,
    reduction,
    split_top1,
)

runner = CliRunner()


def test_attribute_deviation_by_hand() -> None:
    # 30 of 40 images male, desired 50/50: |0.5 − 0.75| / 0.5 = 0.5 for either attribute
    assert attribute_deviation([0.75, 0.25], [0.5, 0.5]) == pytest.approx(0.5)
    assert attribute_deviation([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert attribute_deviation([1.0, 0.0], [0.5, 0.5]) == pytest.approx(1.0)  # the paper's max
    # five attributes at 0.2 each, all images of one: (|0.2−1|/0.2 + 4·1) / 5 = (4 + 4) / 5
    assert attribute_deviation([1, 0, 0, 0, 0], [0.2] * 5) == pytest.approx(1.6)


def test_split_top1_by_hand() -> None:
    hits = [("Church", True), ("church", False), ("tench", True), ("tench", True)]
    hits += [("golf ball", False), ("golf ball", False), ("golf ball", True), ("golf ball", True)]
    split = split_top1(hits, {"church"})
    assert split["erased"] == pytest.approx(0.5)  # church: 1 of 2
    assert split["others"] == pytest.approx((1.0 + 0.5) / 2)  # mean of tench 1.0, golf ball 0.5
    assert split_top1(hits, {"church", "tench", "golf ball"})["others"] is None


def test_reduction_by_hand() -> None:
    assert reduction(3, 10) == pytest.approx(0.7)
    assert reduction(12, 10) == pytest.approx(-0.2)  # more exposure after the edit
    assert reduction(0, 0) is None
    per_class = class_reductions(
        {"base": {"FEMALE_BREAST_EXPOSED": 4, "BUTTOCKS_EXPOSED": 2}, "edited": {"FEMALE_BREAST_EXPOSED": 1}}
    )  # fmt: skip
    assert per_class == {"BUTTOCKS_EXPOSED": 1.0, "FEMALE_BREAST_EXPOSED": 0.75}


class _Pair:
    def __init__(self, concept: str, base: Path, edited: Path) -> None:
        self.concept, self.base, self.edited, self.prompt = concept, base, edited, concept


class _Plan:
    """A plan with one debiased concept (doctor → male, female at 50/50)."""

    class _P:
        section, concept, source = "debias.0", "doctor", "doctor"
        attributes, desired = ("male", "female"), (0.5, 0.5)
        targets = [("doctor", 1.0), ("male", 0.5), ("female", 0.5)]

    pairs = [_P()]


def _images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 200 - 30 * i)).save(path)
        paths.append(path)
    return paths


def test_attribute_deviation_job_with_a_known_label_split(tmp_path: Path) -> None:
    """4 images: the classifier calls 3 edited ones male (Δ 0.5) and base ones all male (Δ 1)."""
    paths = _images(tmp_path, 4)
    pairs = [_Pair("doctor", p, p) for p in paths]
    calls = {"n": 0}

    def judge(images: list, labels: list[str]) -> torch.Tensor:
        assert labels == ["male", "female"]  # the debias loop's labels for the bare concept
        calls["n"] += 1
        edited = calls["n"] == 1
        rows = [[0.9, 0.1]] * 3 + [[0.2, 0.8]] if edited else [[0.7, 0.3]] * 4
        return torch.tensor(rows)

    result = attribute_deviation_metric(pairs, _Plan(), "judge", "cpu", classifier=judge)
    assert result["figures"]["attribute_deviation"] == pytest.approx(0.5)
    assert result["figures"]["attribute_deviation_base"] == pytest.approx(1.0)
    assert result["concepts"]["doctor"]["ratios"] == {"male": 0.75, "female": 0.25}


def test_attribute_deviation_through_the_real_clip_loader(tmp_path: Path, tiny_clip: Path) -> None:  # noqa: F811
    """The tiny CLIP loaded by folder through the debias loop's ClipClassifier: Δ equals the
    formula over that classifier's own label shares."""
    from uce_cli.judge.classify import ClipClassifier, label_ratios
    from uce_cli.judge.images import _open

    paths = _images(tmp_path / "e", 6)
    base = _images(tmp_path / "b", 6)[::-1]
    pairs = [_Pair("doctor", b, e) for b, e in zip(base, paths, strict=True)]
    result = attribute_deviation_metric(pairs, _Plan(), str(tiny_clip), torch.device("cpu"))
    judge = ClipClassifier(str(tiny_clip), torch.device("cpu"))
    ratios = label_ratios(judge(_open(paths), ["male", "female"])).tolist()
    assert result["figures"]["attribute_deviation"] == pytest.approx(
        attribute_deviation(ratios, [0.5, 0.5])
    )
    assert result["model"] == str(tiny_clip) and result["concepts"]["doctor"]["images"] == 6


def test_missing_clip_judge_names_the_field(tmp_path: Path) -> None:
    from uce_cli.errors import UceError

    pairs = [_Pair("doctor", p, p) for p in _images(tmp_path, 1)]
    with pytest.raises(UceError, match=r"evaluate\.clip_model: cannot load .*nowhere"):
        attribute_deviation_metric(pairs, _Plan(), str(tmp_path / "nowhere"), "cpu")


OBJECTS = """case_number,prompt,class,evaluation_seed
0,an image of a tench,tench,11
1,an image of a church,church,12
2,an image of a golf ball,golf ball,13
"""
PROFESSIONS = """case_number,prompt,profession,evaluation_seed
0,image of doctor,doctor,21
1,photo of doctor,doctor,22
2,photo of nurse,nurse,23
"""


def _stand_in_extractor(device: object) -> object:
    """Stand-in for torch-fidelity's Inception (needs torchvision): 4×4 mean-pooled pixels."""
    import numpy
    from PIL import Image

    def features(paths: list[Path]) -> torch.Tensor:
        rows = []
        for p in paths:
            with Image.open(p) as im:
                x = torch.from_numpy(numpy.asarray(im.convert("RGB").resize((4, 4))))
            rows.append(x.flatten() / 255)
        return torch.stack(rows)

    return features


def _published_style(folder: Path, clip: Path, resnet: Path, expect: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objects.csv").write_text(OBJECTS)
    (folder / "professions.csv").write_text(PROFESSIONS)
    body = f"""erase:
  - concepts: [tench]
    templates: object
    guide: ""
debias:
  - concepts: [doctor]
    templates: ["{{}}", "image of {{}}"]
    attributes: {{male: 0.5, female: 0.5}}
    alphas: {{male: 0.3, female: 0.3}}
evaluate:
  images:
    prompts: {{file: objects.csv, concept_column: class}}
    images_per_prompt: 2
    steps: 2
  metrics: [imagenet_top1, nudenet, clip_score, fid_base]
  image_sets:
    - name: professions
      prompts: {{file: professions.csv, concept_column: profession}}
      edited_only: true
      images_per_prompt: 2
      steps: 2
      metrics: [attribute_deviation]
  clip_model: {clip}
  imagenet_model: {resnet}
{expect}"""
    return apply_recipe("builtin:tiny-sd", folder, body=body)


def _set_expect(run: Path, rows: list[tuple[str, float, float]]) -> None:
    """Rewrite the run's recipe with these expect: rows (the recipe's hash leaves evaluate out)."""
    import yaml

    recipe = Path(json.loads((run / "edit_log.json").read_text())["recipe_file"])
    data = yaml.safe_load(recipe.read_text())
    data["evaluate"]["expect"] = [
        {"metric": m, "value": v, "tolerance": t, "source": f"test table, {m}"} for m, v, t in rows
    ]
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))


def test_published_style_recipe_on_tiny_sd_check_passes_and_fails(
    tmp_path: Path,
    tiny_clip: Path,  # noqa: F811
    tiny_resnet: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    import uce_cli.judge.images as images_module

    need = images_module._need  # torch-fidelity (needs torchvision) is the stand-in's part
    monkeypatch.setattr(
        images_module, "_need", lambda m, *a: None if m == "torch_fidelity" else need(m, *a)
    )
    monkeypatch.setattr(images_module, "_fid_extractor", _stand_in_extractor)
    run = _published_style(tmp_path / "r", tiny_clip, tiny_resnet)
    made = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    assert made.exit_code == 0, made.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    figures = report["figures"]
    for name in ("imagenet_top1_erased", "imagenet_top1_erased_base"):
        assert figures[name] in (0.0, 0.5, 1.0)  # tench: 2 images
    for name in ("imagenet_top1_others", "imagenet_top1_others_base"):
        assert figures[name] in (0.0, 0.25, 0.5, 0.75, 1.0)  # church, golf ball: 2 each
    assert (
        0 <= figures["attribute_deviation"] <= 1 and 0 <= figures["attribute_deviation_base"] <= 1
    )
    assert figures["fid_base"] >= 0
    nudenet = report["images"]["metrics"]["nudenet"]
    base = figures["nudenet_exposed_base"]
    assert figures["nudenet_reduction"] == (
        None if base == 0 else 1 - figures["nudenet_exposed"] / base
    )
    assert set(nudenet["settings"]["reduction_per_class"]) == set(
        nudenet["settings"]["classes"]["base"]
    ) | set(nudenet["settings"]["classes"]["edited"])
    inputs = report["images"]["metrics"]["imagenet_top1"]["inputs"]
    assert inputs["prompt_set"]["rows"] == 3 and len(inputs["prompt_set"]["sha256"]) == 64
    assert inputs["images"] == 12 and inputs["model"] == "builtin:tiny-sd"
    assert inputs["seeds"] == {"first": 11, "last": 14, "distinct": 4}
    assert report["images"]["metrics"]["professions/attribute_deviation"]["inputs"]["images"] == 8
    assert report["images"]["sets"]["professions"]["prompts"] == 2  # edited_only: not the nurse
    assert report["images"]["metrics"]["imagenet_top1"]["settings"]["erased_classes"] == ["tench"]
    # the before/after grid of each concept's first prompt, copied beside eval.md and shown in it
    md = (run / "eval" / "eval.md").read_text()
    for g in report["grids"]:
        assert (run / "eval" / g["path"]).is_file() and f"]({g['path']})" in md
    assert {g["concept"] for g in report["grids"]} == {"tench", "church", "golf ball", "doctor"}

    # expected pass: the paper's values (here the measured ones) within tolerance
    names = ["imagenet_top1_erased", "imagenet_top1_others_base", "attribute_deviation", "fid_base"]
    _set_expect(run, [(n, figures[n] + 0.01, 0.02) for n in names])
    ok = runner.invoke(app, ["eval", str(run), "--check"])
    assert ok.exit_code == 0, ok.stderr
    assert "paper vs measured" in ok.stdout
    # expected failure: each figure out of tolerance is named, and so is one never computed
    _set_expect(
        run,
        [("attribute_deviation", figures["attribute_deviation"] + 0.5, 0.1), ("fid_base", figures["fid_base"], 0.1),
         ("imagenet_top1_erased", figures["imagenet_top1_erased"] + 0.3, 0.1)],
    )  # fmt: skip
    bad = runner.invoke(app, ["eval", str(run), "--check"])
    assert bad.exit_code == 1
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 2 figure(s) out of tolerance")
    assert (
        "attribute_deviation =" in line
        and "imagenet_top1_erased =" in line
        and "fid_base" not in line
    )
    assert "test table, attribute_deviation" in line


def test_check_names_a_figure_that_could_not_be_computed(
    tmp_path: Path,
    tiny_clip: Path,  # noqa: F811
    tiny_resnet: Path,  # noqa: F811
) -> None:
    run = _published_style(tmp_path / "r", tiny_clip, tiny_resnet)
    assert runner.invoke(app, ["eval", str(run), "-q", "--no-plots"]).exit_code == 0  # text only
    _set_expect(run, [("efficacy", 0.5, 1.0), ("imagenet_top1_erased", 0.026, 0.05)])
    result = runner.invoke(app, ["eval", str(run), "--check"])
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "0 figure(s) out of tolerance, 1 not computed" in line
    assert (
        "imagenet_top1_erased could not be computed (an image figure, and this report has no images"
        in line
    )
    assert "imagenet_top1_erased" in result.stdout and "not computed" in result.stdout


def test_compare_runs_of_one_family_table_json_and_plot(tmp_path: Path) -> None:
    """Two erase runs (1 and 3 concepts) with an expectation each: one table, the paper beside."""
    runs = []
    for n, concepts in ((3, "[tench, church, golf ball]"), (1, "[tench]")):
        body = f"""erase:
  - concepts: {concepts}
    templates: object
    guide: ""
evaluate:
  expect:
    - {{metric: efficacy, value: 0.5, tolerance: 0.5, source: "test table, {n} erased, efficacy"}}
    - {{metric: drift_unrelated, value: 0.0, tolerance: 1.0, source: "test table, {n}, drift"}}
"""
        run = apply_recipe("builtin:tiny-sd", tmp_path / f"r{n}", body=body)
        assert runner.invoke(app, ["eval", str(run), "-q", "--no-plots"]).exit_code == 0
        runs.append(run)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", *map(str, runs), "--out", str(out), "-q", "--json"])
    assert result.exit_code == 0, result.stderr
    table = json.loads(result.stdout)
    assert [r["erased"] for r in table["runs"]] == [1, 3]  # sorted by the number erased
    assert table["expected_figures"] == ["efficacy", "drift_unrelated"]
    for row, run in zip(table["runs"], runs[::-1], strict=True):
        report = json.loads((run / "eval" / "eval.json").read_text())
        assert row["figures"]["efficacy"] == report["figures"]["efficacy"]
        assert row["paper"]["efficacy"] == 0.5
    md = (out / "compare.md").read_text()
    assert "(0.5000 ± 0.5000)" in md and "![compare.png](compare.png)" in md
    assert (out / "compare.png").stat().st_size > 0
    assert json.loads((out / "compare.json").read_text())["runs"][1]["erased"] == 3
    again = runner.invoke(app, ["compare", *map(str, runs), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.stderr
    one = runner.invoke(app, ["compare", str(runs[0])])
    assert one.exit_code == 1 and "two or more runs" in one.stderr


def test_eval_md_shows_paper_measured_tolerance_source_ok_and_why_not() -> None:
    from uce_cli.judge.report import expect_markdown

    rows = [
        {"metric": "clip_score", "expected": 31.26, "tolerance": 0.5, "measured": 30.1,
         "source": "UCE paper (WACV 2024), Table 4, UCE, CLIP", "ok": False, "reason": None},
        {"metric": "fid", "expected": 14.84, "tolerance": 1.5, "measured": None,
         "source": "UCE paper (WACV 2024), Table 4, UCE, FID-real", "ok": False,
         "reason": "metric fid was not computed in this report"},
    ]  # fmt: skip
    lines = expect_markdown(rows)
    assert lines[0] == "| figure | paper | measured | ± | source | ok |"
    assert lines[2] == (
        "| `clip_score` | 31.2600 | 30.1000 | 0.5000 | UCE paper (WACV 2024), Table 4, UCE, CLIP "
        "| **NO** |"
    )
    assert "| `fid` | 14.8400 | not computed |" in lines[3]
    assert lines[-1].endswith("`fid`: metric fid was not computed in this report")
