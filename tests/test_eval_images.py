"""uce eval --images on the tiny model: images drawn by `uce sample`, metrics from tiny random CLIP
and ResNet models saved with save_pretrained (the path real weights take), NudeNet for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import apply_recipe
from uce_cli.cli import app

runner = CliRunner()
CSV = """case_number,prompt,class,evaluation_seed
0,an image of a tench,tench,11
1,an image of a church,church,12
"""


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model and processor, saved as a hub folder would be."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from uce_cli.weights.tiny import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tok = build_tiny_tokenizer()
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ResNet with ImageNet's label names for the two classes used here."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    folder = tmp_path_factory.mktemp("resnet")
    labels = {i: f"class {i}" for i in range(1000)}
    labels[0], labels[497] = "tench, Tinca tinca", "church, church building"
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=1000,
        id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(folder)
    return folder


def _run(tiny_model: Path, folder: Path, clip: Path, resnet: Path, metrics: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objects.csv").write_text(CSV)
    body = f"""erase:
  - concepts: [tench]
    templates: object
    guide: ""
evaluate:
  heldout:
    - {{file: objects.csv, concept_column: class}}
  images:
    prompts: {{file: objects.csv, concept_column: class}}
    images_per_prompt: 2
    steps: 2
  metrics: [{metrics}]
  clip_model: {clip}
  imagenet_model: {resnet}
"""
    return apply_recipe(tiny_model, folder, body=body)


def test_image_metrics_on_tiny_models(
    tiny_model: Path, tiny_clip: Path, tiny_resnet: Path, tmp_path: Path
) -> None:
    run = _run(
        tiny_model, tmp_path / "r", tiny_clip, tiny_resnet,
        "clip_score, clip_accuracy, imagenet_top1, nudenet",
    )  # fmt: skip
    result = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    assert result.exit_code == 0, result.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    images = report["images"]
    assert images["images"] == 8 and images["prompts"] == 2  # 2 prompts × 2 seeds × base/edited
    manifest = json.loads((run / "eval" / "samples" / "manifest.json").read_text())
    seeds = sorted(int(e["seed"]) for e in manifest["images"] if e["role"] == "edited")
    assert seeds == [11, 12, 12, 13]  # the CSV's evaluation_seed, then seed+1
    figures = report["figures"]
    for name in ("clip_score", "clip_score_base"):
        assert -100 <= figures[name] <= 100
    for name in ("clip_accuracy", "clip_accuracy_base", "imagenet_top1", "imagenet_top1_base"):
        assert figures[name] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert figures["nudenet_exposed"] >= 0 and figures["nudenet_exposed_base"] >= 0
    clip = images["metrics"]["clip"]
    assert clip["model"] == str(tiny_clip) and clip["settings"]["classes"] == 2
    assert clip["versions"]["transformers"] != "not installed"
    assert images["metrics"]["nudenet"]["settings"]["threshold"] == 0.0
    assert images["metrics"]["imagenet_top1"]["images_per_second"] > 0

    # resumed: the same images are reused, and the figures do not change
    again = runner.invoke(app, ["eval", str(run), "--images", "--force", "-q"])
    assert again.exit_code == 0, again.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["figures"] == figures
    # plots: concepts, layers, and the edited concept's before/after grid from uce sample
    assert report["plots"] == ["concepts.png", "layers.png", "worst-best.png"]
    from PIL import Image

    with Image.open(run / "eval" / "worst-best.png") as grid:
        assert grid.width > 0 and grid.height > 20
    assert "![worst-best.png](worst-best.png)" in (run / "eval" / "eval.md").read_text()


def test_samples_made_with_other_settings_are_refused(
    tiny_model: Path, tiny_clip: Path, tiny_resnet: Path, tmp_path: Path
) -> None:
    run = _run(tiny_model, tmp_path / "r", tiny_clip, tiny_resnet, "clip_score")
    samples = tmp_path / "s"
    made = runner.invoke(
        app,
        ["sample", "--edit", str(run), "--compare", "--prompts-file", str(run.parent / "objects.csv"),
         "--steps", "3", "--out", str(samples), "-q"],
    )  # fmt: skip
    assert made.exit_code == 0, made.stderr
    result = runner.invoke(app, ["eval", str(run), "--samples", str(samples), "-q", "--no-plots"])
    assert result.exit_code == 1
    assert "images made with steps '3', the recipe's evaluate.images says '2'" in result.stderr
    shutil.rmtree(samples / "edited")
    (samples / "manifest.json").write_text(
        (samples / "manifest.json").read_text().replace('"steps": "3"', '"steps": "2"')
    )
    result = runner.invoke(app, ["eval", str(run), "--samples", str(samples), "-q", "--no-plots"])
    assert result.exit_code == 1 and "missing" in result.stderr


def test_unavailable_model_fails_with_what_to_fetch(
    tiny_model: Path, tiny_resnet: Path, tmp_path: Path
) -> None:
    run = _run(
        tiny_model, tmp_path / "r", Path("openai/clip-vit-base-patch32"), tiny_resnet, "clip_score"
    )
    result = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    assert result.exit_code == 1
    assert (
        "metric clip_score: model 'openai/clip-vit-base-patch32' is not available here"
        in result.stderr
    )
    assert "hf download openai/clip-vit-base-patch32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_extra_names_it(tiny_model: Path, tiny_clip: Path, tiny_resnet: Path,
                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import sys

    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the extra were not installed
    run = _run(tiny_model, tmp_path / "r", tiny_clip, tiny_resnet, "nudenet")
    result = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    # skipped, said, and listed; the text side is still reported (tests/test_eval_judges.py)
    assert result.exit_code == 0, result.stderr
    assert "warning: metric nudenet needs the `nudenet` package" in result.stderr
    assert 'pip install "uce-cli[eval]"' in result.stderr
    assert not (run / "eval" / "samples").exists()  # nothing left to compute: nothing drawn
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert list(report["images"]["skipped"]) == ["nudenet"]


@pytest.mark.gpu
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (lpips needs torchvision)"
)
def test_lpips_and_fid(
    tiny_model: Path, tiny_clip: Path, tiny_resnet: Path, tmp_path: Path
) -> None:
    """Needs `lpips` and `torch-fidelity` with a working torchvision and their weights."""
    run = _run(tiny_model, tmp_path / "r", tiny_clip, tiny_resnet, "lpips")
    result = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    assert result.exit_code == 0, result.stderr
    figures = json.loads((run / "eval" / "eval.json").read_text())["figures"]
    assert figures["lpips"] >= 0


# --- FID: the real code path with a stand-in extractor (tests/fakes/torch_fidelity) -----------
FAKES = Path(__file__).parent / "fakes"


def fid_run(tiny_model: Path, folder: Path, reference_images: int = 6) -> Path:
    """An erase run whose evaluate: asks for fid against ``reference_images`` noise images."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "objects.csv").write_text(CSV)
    reference = folder / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(reference_images):
        pixels = rng.integers(0, 256, size=(24 + 8 * (i % 2), 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(reference / f"ref-{i}.png")  # two sizes: batching by size
    body = """erase:
  - concepts: [tench]
    templates: object
    guide: ""
evaluate:
  images:
    prompts: {file: objects.csv, concept_column: class}
    images_per_prompt: 2
    steps: 2
    reference: reference
  metrics: [fid]
"""
    return apply_recipe(tiny_model, folder, body=body)


def use_fake_fidelity(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.syspath_prepend(str(FAKES))
    for name in [m for m in sys.modules if m.startswith("torch_fidelity")]:
        monkeypatch.delitem(sys.modules, name)


def independent_fid(edited: list[Path], reference: list[Path]) -> float:
    """FID from the extractor's features by another route: eigenvalues of Σa·Σb (not symmetric)."""
    import numpy as np
    import torch
    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])

    @torch.no_grad()
    def feats(paths: list[Path]) -> torch.Tensor:
        rows = []
        for p in paths:
            x = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
            rows.append(net(x[None])[0][0].double())
        return torch.stack(rows)

    a, b = feats(edited), feats(reference)
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    eig = np.linalg.eigvals(ca @ cb)
    tr_root = np.sqrt(np.clip(eig.real, 0, None)).sum()
    diff = (a.mean(0) - b.mean(0)).numpy()
    return float(diff @ diff + np.trace(ca) + np.trace(cb) - 2 * tr_root)


def test_fid_is_the_frechet_distance_of_the_extracted_features(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_fake_fidelity(monkeypatch)
    run = fid_run(tiny_model, tmp_path / "r")
    result = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    assert result.exit_code == 0, result.stderr
    report = json.loads((run / "eval" / "eval.json").read_text())
    samples = Path(report["images"]["samples"])
    fid = report["images"]["metrics"]["fid"]
    assert fid["settings"]["reference_images"] == 6 and fid["settings"]["edited_images"] == 4
    edited = sorted((samples / "edited").glob("*.png"))
    reference = sorted((run.parent / "reference").glob("*.png"))
    assert len(edited) == 4
    expected = independent_fid(edited, reference)
    assert expected > 0.01
    assert report["figures"]["fid"] == pytest.approx(expected, rel=1e-6)


def test_fid_without_its_weights_names_what_to_fetch(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_fake_fidelity(monkeypatch)
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "__init__", offline)
    run = fid_run(tiny_model, tmp_path / "r")
    result = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    assert result.exit_code == 1
    assert "metric fid: torch-fidelity's Inception weights are not available here" in result.stderr
    assert "https://example.invalid/weights-inception.pth" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fid_reference_folder_checked_before_drawing(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_fake_fidelity(monkeypatch)
    run = fid_run(tiny_model, tmp_path / "r", reference_images=1)
    result = runner.invoke(app, ["eval", str(run), "--images", "-q", "--no-plots"])
    assert result.exit_code == 1
    assert "holds 1 image(s) — FID needs a reference set" in result.stderr
    assert not (run / "eval" / "samples").exists()
