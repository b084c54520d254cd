"""`uce attack`'s further outputs (issue 17): attack.png beside attack.json/attack.md (and none
with --no-plots), and the image side judged with the recipe's CLIP accuracy and ImageNet top-1
(eval's judges), checked against an independent zero-shot/top-1 computation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import apply_recipe
from uce_cli.cli import app

runner = CliRunner()

ERASE = """
erase:
  - concepts: [Kelly Mckernan, Thomas Kinkade]
    templates: art
    guide: art
"""


def test_attack_png_is_written_embedded_and_listed_and_absent_with_no_plots(
    tiny_model: Path, tmp_path: Path
) -> None:
    from PIL import Image

    run = apply_recipe(tiny_model, tmp_path, ["delta"], body=ERASE)
    result = runner.invoke(app, ["attack", str(run), "--budget", "16", "-q"])
    assert result.exit_code == 0, result.output
    folder = run / "attack"
    report = json.loads((folder / "attack.json").read_text())
    assert report["plots"] == ["attack.png"]
    assert (folder / "attack.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(folder / "attack.png") as png:
        assert png.width >= 600 and png.height == 400  # 6×4 in at 100 dpi, wider with more bars
    assert "](attack.png)" in (folder / "attack.md").read_text()
    assert "attack.png" in report["outputs"]  # a later --force may replace it (destination.py)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging left over

    result = runner.invoke(
        app, ["attack", str(run), "--budget", "16", "-q", "--force", "--no-plots"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "attack.json").read_text())
    assert not (folder / "attack.png").exists() and "plots" not in report
    assert "attack.png" not in (folder / "attack.md").read_text()
    assert "attack.png" not in report["outputs"]


def test_missing_matplotlib_is_said_before_any_work(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    run = apply_recipe(tiny_model, tmp_path, ["delta"], body=ERASE)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    result = runner.invoke(app, ["attack", str(run), "--budget", "8", "-q"])
    assert result.exit_code == 1
    assert "plots need matplotlib" in result.output and "--no-plots" in result.output
    assert not (run / "attack").exists()
    result = runner.invoke(app, ["attack", str(run), "--budget", "8", "-q", "--no-plots"])
    assert result.exit_code == 0, result.output


OBJECTS = """
erase:
  - concepts: [tench, church]
    templates: object
    guide: ""
evaluate:
  images: {prompts: {file: objects.csv, concept_column: class}, steps: 2}
  metrics: [clip_accuracy, clip_score, imagenet_top1]
  clip_model: builtin:tiny-clip
  imagenet_model: builtin:tiny-resnet
"""


def objects_run(
    tiny_model: Path, folder: Path, resnet: str = "builtin:tiny-resnet", more: str = ""
) -> Path:
    """An erase of two ImageNette classes whose recipe judges images with the builtin judges."""
    from tests.test_eval_images import CSV

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objects.csv").write_text(CSV)
    body = OBJECTS.replace("builtin:tiny-resnet", resnet).replace("top1]", f"top1{more}]")
    return apply_recipe(tiny_model, folder, ["delta"], body=body)


@torch.inference_mode()
def independent_judgement(
    folder: Path, images: list[dict], resnet: str = "builtin:tiny-resnet"
) -> dict[str, float]:
    """Per variant: the share of images the tiny CLIP names the concept (zero-shot among tench,
    church), and the share whose tiny-ResNet top-1 label names it — straight from transformers."""
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        CLIPModel,
        CLIPProcessor,
    )

    from uce_cli.judge.classify import judge_source

    clip_dir, _ = judge_source("builtin:tiny-clip", "clip")
    resnet_dir, _ = judge_source(resnet, "imagenet", clip=False)
    clip, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    resnet = AutoModelForImageClassification.from_pretrained(resnet_dir)
    rproc = AutoImageProcessor.from_pretrained(resnet_dir)

    def unit(x: object) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else x.pooler_output
        return x / x.norm(dim=-1, keepdim=True)

    classes = ["tench", "church"]
    text = proc(text=[f"a photo of {c}" for c in classes], return_tensors="pt", padding=True)
    class_emb = unit(clip.get_text_features(**text))
    hits: dict[str, list[float]] = {}
    for item in images:
        image = Image.open(folder / item["path"]).convert("RGB")
        pixels = proc(images=[image], return_tensors="pt")["pixel_values"]
        predicted = classes[
            int((unit(clip.get_image_features(pixel_values=pixels)) @ class_emb.T).argmax())
        ]
        top1 = int(resnet(**rproc(images=[image], return_tensors="pt")).logits.argmax())
        names = {n.strip().lower() for n in resnet.config.id2label[top1].split(",")}
        v = item["variant"]
        hits.setdefault(f"clip_accuracy_{v}", []).append(float(predicted == item["concept"]))
        hits.setdefault(f"imagenet_top1_{v}", []).append(float(item["concept"] in names))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def test_attack_images_are_judged_with_clip_accuracy_and_imagenet_top1(
    tiny_model: Path, tmp_path: Path
) -> None:
    run = objects_run(tiny_model, tmp_path)
    args = ["attack", str(run), "--images", "--budget", "8", "--per-variant", "2", "-q"]
    result = runner.invoke(app, [*args, "--no-plots"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "attack" / "attack.json").read_text())
    images = report["images"]
    assert images["judged"] == "clip_accuracy, clip_score, imagenet_top1"
    assert images["clip_classes"] == ["tench", "church"]
    variants = [
        v for v in ("prompt", "estar", "found") if any(i["variant"] == v for i in images["images"])
    ]
    assert variants[:2] == ["prompt", "estar"]
    expected = independent_judgement(run / "attack", images["images"])
    assert set(expected) == {
        f"{m}_{v}" for m in ("clip_accuracy", "imagenet_top1") for v in variants
    }
    for name, value in expected.items():
        assert images["figures"][name] == pytest.approx(value, abs=1e-6), name
    for v in variants:
        assert -100 <= images["figures"][f"clip_score_{v}"] <= 100
    md = (run / "attack" / "attack.md").read_text()
    assert "Judged: clip_accuracy, clip_score, imagenet_top1." in md
    assert "- imagenet_top1_estar:" in md
    shutil.rmtree(run / "attack")


def test_attack_images_say_why_clip_accuracy_needs_two_classes(
    tiny_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "objects.csv").write_text("prompt,class\nan image of a tench,tench\n")
    body = OBJECTS.replace("[tench, church]", "[tench]").replace(
        "[clip_accuracy, clip_score, imagenet_top1]", "[clip_accuracy]"
    )
    run = apply_recipe(tiny_model, tmp_path, ["delta"], body=body)
    args = ["attack", str(run), "--images", "--budget", "0", "--per-variant", "1", "-q"]
    result = runner.invoke(app, [*args, "--no-plots"])
    assert result.exit_code == 0, result.output
    images = json.loads((run / "attack" / "attack.json").read_text())["images"]
    assert images["judged"].startswith("not judged: zero-shot needs two classes")
    assert images["figures"] == {}


def test_attack_images_top1_counts_the_label_names_of_the_concept(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The builtin ResNet relabelled so that every even class is named tench and every odd one
    church: its top-1 names the concept about half the time, so the per-variant shares are not
    all 0 and must match the independent count."""
    from uce_cli.judge.classify import judge_source

    source, _ = judge_source("builtin:tiny-resnet", "imagenet", clip=False)
    resnet = Path(shutil.copytree(source, tmp_path / "resnet"))
    config = json.loads((resnet / "config.json").read_text())
    config["id2label"] = {str(i): "tench" if i % 2 == 0 else "church" for i in range(1000)}
    config["label2id"] = {"tench": 0, "church": 1}
    (resnet / "config.json").write_text(json.dumps(config))
    run = objects_run(tiny_model, tmp_path / "r", str(resnet))
    args = ["attack", str(run), "--images", "--budget", "8", "--per-variant", "3", "-q"]
    assert runner.invoke(app, [*args, "--no-plots"]).exit_code == 0
    images = json.loads((run / "attack" / "attack.json").read_text())["images"]
    expected = independent_judgement(run / "attack", images["images"], str(resnet))
    top1 = {k: v for k, v in expected.items() if k.startswith("imagenet_top1_")}
    assert len(top1) == 3 and 0 < sum(top1.values()) < 3  # neither all hits nor all misses
    for name, value in top1.items():
        assert images["figures"][name] == pytest.approx(value, abs=1e-6), name


def test_two_launched_processes_draw_and_judge_the_one_process_attack_images(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`accelerate launch` with two CPU processes: image i is rank i % 2's, the judges (NudeNet,
    CLIP, ResNet) score each rank's share; images, per-image counts and figures equal a
    one-process run's."""
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from tests.test_distributed import launch

    pytest.importorskip("nudenet", reason="nudenet is not installed")
    one = objects_run(tiny_model, tmp_path / "one", more=", nudenet")
    two = Path(shutil.copytree(one, tmp_path / "two" / "out", symlinks=True))
    args = ["--images", "--budget", "8", "--per-variant", "2", "--device", "cpu", "-q"]
    # launched processes run one thread each; the reference too (CPU rounding follows threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = runner.invoke(app, ["attack", str(one), *args])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    proc = launch(2, "attack", two, *args)
    assert proc.returncode == 0, proc.stderr
    a = json.loads((one / "attack" / "attack.json").read_text())
    b = json.loads((two / "attack" / "attack.json").read_text())
    assert a["images"]["settings"]["drawn_per_rank"] == [12]
    assert b["images"]["settings"]["drawn_per_rank"] == [6, 6]  # images 0, 2, … and 1, 3, …
    assert a["images"]["judged"] == "nudenet, clip_accuracy, clip_score, imagenet_top1"
    # same order, prompts, seeds, paths and per-image NudeNet counts
    assert b["images"]["images"] == a["images"]["images"]
    assert len(a["images"]["images"]) == 12  # 2 concepts × 3 variants × 2 seeds
    for key, value in a["figures"].items():  # the text attack: rank 0's, sent to rank 1
        assert b["figures"][key] == pytest.approx(value, abs=1e-5), key
    assert set(b["images"]["figures"]) == set(a["images"]["figures"])
    for key, value in a["images"]["figures"].items():
        assert b["images"]["figures"][key] == pytest.approx(value, abs=1e-5), key
    for item in a["images"]["images"]:  # rank 1 drew every other image into rank 0's stage
        assert (two / "attack" / item["path"]).read_bytes() == (
            one / "attack" / item["path"]
        ).read_bytes()
    assert not [p for p in two.iterdir() if p.name.startswith(".")]  # no staging left over


def test_launched_attack_without_images_is_rank_zeros_alone(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Without --images the other ranks have nothing to do: they return at once and rank 0
    attacks and writes alone (nobody waits on a collective the others never join)."""
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from tests.test_distributed import launch

    run = apply_recipe(tiny_model, tmp_path, ["delta"], body=ERASE)
    proc = launch(2, "attack", run, "--budget", "8", "--device", "cpu", "-q", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "attack" / "attack.json").read_text())
    assert set(report["concepts"]) == {"Kelly Mckernan", "Thomas Kinkade"}
    assert proc.stdout.count("Kelly Mckernan") == 1  # rank 0 prints the table, rank 1 nothing


def test_launched_attack_images_failing_on_rank_zero_stop_every_rank(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Only rank 0 attacks, so only rank 0 reads the edit first: a truncated edit.safetensors
    fails there, rank 0 tells rank 1 instead of sending a report, both stop (no rank waits
    forever) and nothing is written."""
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from tests.test_distributed import launch

    run = apply_recipe(tiny_model, tmp_path, ["delta"], body=ERASE)
    edit = run / "edit.safetensors"
    edit.write_bytes(edit.read_bytes()[:100])
    proc = launch(2, "attack", run, "--images", "--budget", "0", "--device", "cpu", "-q")
    assert proc.returncode == 1, proc.stderr
    assert "edit.safetensors: cannot read it" in proc.stderr
    assert "rank 0 failed: " in proc.stderr  # what rank 1 says
    assert not (run / "attack").exists()
