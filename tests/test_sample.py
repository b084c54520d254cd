"""Tests for ``uce sample``: seeds, edits, compare grids, prompt CSVs, resume, metadata, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from uce_cli.cli import app
from uce_cli.edit.prompts import read_prompts_csv
from uce_cli.grid import grid_layout

runner = CliRunner()
FAST = ["--steps", "2", "--quiet"]


def sample(*args: str | Path) -> Result:
    """Run ``uce sample`` with 2 steps (the tiny model's default size is 64×64)."""
    return runner.invoke(app, ["sample", *FAST, *(str(a) for a in args)])


def sample_json(*args: str | Path) -> dict:
    """Run ``uce sample --json``; assert success and return its summary."""
    result = sample(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def pixels(path: Path) -> np.ndarray:
    """The image as an int array (so differences do not wrap)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def compare_run(erased_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A finished compare run: two prompts (one with emoji), two seeds each, base vs edit folder."""
    out = tmp_path_factory.mktemp("compare") / "samples"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        summary = sample_json(
            "--edit", erased_model, "--compare", "--out", out, "--n", "2", "--seed", "7",
            "--prompt", "painting by Kelly Mckernan", "--prompt", "a dog 🐕 in the city",
        )  # fmt: skip
    return out, summary


# --------------------------------------------------------------------------------------- CSV


def test_csv_multiline_quoted_prompts_and_per_row_seeds(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text(
        "case_number,prompt,evaluation_seed,extra\n"
        '3,"a cat, sitting\non two lines",41337,x\n'
        '10,"she said ""hi""",5,y\n'
        "11,plain,0,z\n",
        encoding="utf-8",
    )
    rows = read_prompts_csv(path)
    assert [(r.case, r.prompt, r.seed) for r in rows] == [
        ("3", "a cat, sitting\non two lines", 41337),
        ("10", 'she said "hi"', 5),
        ("11", "plain", 0),
    ]
    assert [r.case for r in read_prompts_csv(path, limit=2)] == ["3", "10"]


def test_csv_without_optional_columns_uses_row_index(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt\nfirst\nsecond\n", encoding="utf-8")
    rows = read_prompts_csv(path)
    assert [(r.case, r.seed) for r in rows] == [("0", None), ("1", None)]


def test_csv_reads_the_published_evaluation_sets(tiny_model: Path, tmp_path: Path) -> None:
    mirror = Path(os.environ.get("UCE_DATA_MIRROR", "/nonexistent"))  # set by conftest when present
    if not (mirror / "coco_30k.csv").is_file() or not (mirror / "unsafe-prompts4703.csv").is_file():
        pytest.skip("no upstream data mirror with coco_30k.csv and unsafe-prompts4703.csv")
    coco = read_prompts_csv(mirror / "coco_30k.csv")
    assert len(coco) == 30000
    assert coco[0].prompt == "A bicycle replica with a clock as the front wheel."
    assert (coco[0].case, coco[0].seed) == ("0", 41337)
    assert any("\n" in r.prompt for r in coco)  # quoted multi-line fields survive
    assert len(read_prompts_csv(mirror / "coco_30k.csv", limit=5)) == 5
    # The I2P set holds one empty prompt (case 2260): refused with its line, accepted on request.
    with pytest.raises(Exception, match=r"unsafe-prompts4703.csv line \d+: empty prompt"):
        read_prompts_csv(mirror / "unsafe-prompts4703.csv")
    unsafe = read_prompts_csv(mirror / "unsafe-prompts4703.csv", allow_empty=True)
    assert len(unsafe) == 4703
    assert unsafe[0].seed == 4261553411
    assert sum("\n" in r.prompt for r in unsafe) == 4
    # Sampled by the CLI: files are named <case_number>-<evaluation_seed>.
    summary = sample_json(
        "--model",
        tiny_model,
        "--prompts-file",
        mirror / "coco_30k.csv",
        "--limit",
        "2",
        "--out",
        tmp_path,
    )
    assert summary["generated"] == 2
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["0-41337.png", "1-63155.png"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("text,seed\na,1\n", "no 'prompt' column (columns: 'text', 'seed')"),
        ("prompt,case_number\nok,1\n  ,2\n", "p.csv line 3: empty prompt"),
        (
            "prompt,evaluation_seed\nok,12x\n",
            "p.csv line 2: evaluation_seed '12x' is not a whole number",
        ),
        (
            "prompt,case_number\na,1\nb,1\n",
            "p.csv line 3: case_number '1' repeats the row of line 2",
        ),
        ("prompt\n", "no prompt rows"),
    ],
)
def test_csv_errors_are_clear(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text, encoding="utf-8")
    result = sample("--model", tmp_path, "--prompts-file", path, "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_empty_prompt_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    result = sample(
        "--model", tiny_model, "--prompt", "ok", "--prompt", " ", "--out", tmp_path / "o"
    )
    assert result.exit_code == 1
    assert "--prompt number 2 is empty" in result.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------- seeds, CSV


def test_same_seed_same_pixels_across_runs(tiny_model: Path, tmp_path: Path) -> None:
    args = ["--model", tiny_model, "--prompt", "a photo of a cat", "--seed", "3"]
    sample_json(*args, "--out", tmp_path / "a")
    sample_json(*args, "--out", tmp_path / "b")
    sample_json(
        "--model",
        tiny_model,
        "--prompt",
        "a photo of a cat",
        "--seed",
        "4",
        "--out",
        tmp_path / "c",
    )
    first = pixels(tmp_path / "a" / "base" / "0-3.png")
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, pixels(tmp_path / "b" / "base" / "0-3.png"))
    assert not np.array_equal(first, pixels(tmp_path / "c" / "base" / "0-4.png"))


def test_per_row_seeds_are_honoured_and_batching_does_not_change_images(
    tiny_model: Path, tmp_path: Path
) -> None:
    csv_file = tmp_path / "p.csv"
    csv_file.write_text(
        'case_number,prompt,evaluation_seed\n5,"a cat\non a sofa",11\n6,a dog,12\n7,a car,13\n'
    )
    summary = sample_json(
        "--model",
        tiny_model,
        "--prompts-file",
        csv_file,
        "--batch-size",
        "3",
        "--out",
        tmp_path / "csv",
    )
    assert summary["generated"] == 3
    assert sorted(p.name for p in (tmp_path / "csv" / "base").iterdir()) == [
        "5-11.png",
        "6-12.png",
        "7-13.png",
    ]
    # The same prompt and seed drawn alone, in a batch of one, gives the same image.
    sample_json(
        "--model", tiny_model, "--prompt", "a dog", "--seed", "12", "--out", tmp_path / "one"
    )
    batched, alone = (
        pixels(tmp_path / "csv" / "base" / "6-12.png"),
        pixels(tmp_path / "one" / "base" / "0-12.png"),
    )
    assert np.abs(batched - alone).max() <= 1  # batched matmuls may round differently
    with Image.open(tmp_path / "csv" / "base" / "5-11.png") as im:
        assert im.info["prompt"] == "a cat\non a sofa"
        assert im.info["seed"] == "11"


# --------------------------------------------------------------------- compare, metadata, grid


def test_compare_writes_images_grids_and_manifest(
    compare_run: tuple[Path, dict], tiny_model: Path
) -> None:
    out, summary = compare_run
    assert summary["generated"] == 8 and summary["skipped"] == 0
    assert summary["seconds_per_image"] > 0
    names = ["0-7.png", "0-8.png", "1-7.png", "1-8.png"]
    for role in ("base", "edited"):
        assert sorted(p.name for p in (out / role).iterdir()) == names
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert len(manifest["images"]) == 8
    assert manifest["grids"] == ["grids/0.png", "grids/1.png"]
    for entry in manifest["images"]:
        with Image.open(out / entry["path"]) as im:
            text = dict(im.info)
        for key in ("prompt", "seed", "model", "edit_sha256", "role", "steps", "scheduler"):
            assert text[key] == entry[key], key
        assert entry["model"] == str(tiny_model)  # the base named by the edit's log
        assert (entry["edit_sha256"] == "") == (entry["role"] == "base")
    edited = [e for e in manifest["images"] if e["role"] == "edited"]
    assert {e["edit_sha256"] for e in edited} == {manifest["settings"]["edit_sha256"]}
    assert len(manifest["settings"]["edit_sha256"]) == 64
    emoji = next(e for e in manifest["images"] if e["case_number"] == "1")
    assert emoji["prompt"] == "a dog 🐕 in the city"  # non-Latin-1 text survives (iTXt chunk)
    # The edit changes the erased concept's image; same seed, different model.
    assert not np.array_equal(pixels(out / "base" / "0-7.png"), pixels(out / "edited" / "0-7.png"))


def test_compare_grid_size_panels_and_labels(compare_run: tuple[Path, dict]) -> None:
    out, _ = compare_run
    with Image.open(out / "grids" / "0.png") as im:
        grid = im.convert("RGB")
        info = dict(im.info)
    assert json.loads(info["labels"]) == [
        "base · seed 7",
        "base · seed 8",
        "edited · seed 7",
        "edited · seed 8",
    ]
    assert info["prompt"] == "painting by Kelly Mckernan" and info["seeds"] == "7,8"
    # Header: one prompt line and one model/edit line.
    layout = grid_layout((64, 64), rows=2, cols=2, header_lines=2)
    assert layout.panel == (256, 256)  # 64 px images are upscaled 4× (nearest) to stay readable
    assert grid.size == layout.size
    for r, role in enumerate(("base", "edited")):
        for c, seed in enumerate((7, 8)):
            panel = np.asarray(grid.crop(layout.box(r, c))).astype(int)
            with Image.open(out / role / f"0-{seed}.png") as image:
                expected = np.asarray(
                    image.convert("RGB").resize(layout.panel, Image.Resampling.NEAREST)
                )
            assert np.array_equal(panel, expected), (role, seed)
            left, _, right, bottom = layout.box(r, c)
            label = np.asarray(grid.crop((left, bottom, right, bottom + layout.label)))
            assert label.min() < 128  # text drawn under every panel
    header = np.asarray(grid.crop((0, 0, grid.size[0], layout.header)))
    assert header.min() < 128


def test_edit_file_folder_and_saved_pipeline_agree(
    compare_run: tuple[Path, dict], erased_model: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out, _ = compare_run
    summary = sample_json(
        "--model", tiny_model, "--edit", erased_model / "edit.safetensors", "--out", tmp_path / "delta",
        "--seed", "7", "--prompt", "painting by Kelly Mckernan",
    )  # fmt: skip
    assert summary["generated"] == 1
    from_file = tmp_path / "delta" / "edited" / "0-7.png"
    assert np.array_equal(pixels(from_file), pixels(out / "edited" / "0-7.png"))
    with Image.open(from_file) as a, Image.open(out / "edited" / "0-7.png") as b:
        assert a.info["edit_sha256"] == b.info["edit_sha256"]  # same edit, same hash
    # Swapping the edit into the base pipeline is exact: it matches the saved edited pipeline.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        erased_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "painting by Kelly Mckernan", num_inference_steps=2, guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(7)], output_type="pil",
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image).astype(int), pixels(from_file))
    # …and the base images of a compare run equal sampling the base alone (weights restored).
    sample_json(
        "--model",
        tiny_model,
        "--seed",
        "7",
        "--prompt",
        "painting by Kelly Mckernan",
        "--out",
        tmp_path / "b",
    )
    assert np.array_equal(
        pixels(tmp_path / "b" / "base" / "0-7.png"), pixels(out / "base" / "0-7.png")
    )


# ---------------------------------------------------------------------------------- resume


def test_resume_skips_existing_images(erased_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["--edit", erased_model, "--compare", "--prompt", "a cat", "--out", out]
    assert sample_json(*args)["generated"] == 2
    images = sorted([*out.glob("base/*.png"), *out.glob("edited/*.png")])
    before = {p: os.stat(p).st_mtime_ns for p in images}
    again = sample_json(*args)
    assert (again["generated"], again["skipped"], again["seconds_per_image"]) == (0, 2, None)
    assert {p: os.stat(p).st_mtime_ns for p in images} == before
    # A larger run in the same folder draws only the new images.
    more = sample_json(*args, "--n", "2")
    assert (more["generated"], more["skipped"]) == (2, 2)
    assert {p: os.stat(p).st_mtime_ns for p in images} == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(e["path"] for e in manifest["images"]) == [
        "base/0-0.png", "base/0-1.png", "edited/0-0.png", "edited/0-1.png",
    ]  # fmt: skip
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporary files


def test_resume_refuses_images_made_with_other_settings(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    sample_json("--model", tiny_model, "--prompt", "a cat", "--out", out)
    result = runner.invoke(
        app,
        [
            "sample",
            "--steps",
            "3",
            "--model",
            str(tiny_model),
            "--prompt",
            "a cat",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 1
    assert "0-0.png (steps: '2' here, '3' now) already exist" in result.stderr
    assert "choose another --out" in result.stderr


# ---------------------------------------------------------------------------------- options


def test_scheduler_by_class_name(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    sample_json(
        "--model",
        tiny_model,
        "--prompt",
        "a cat",
        "--scheduler",
        "EulerDiscreteScheduler",
        "--out",
        out,
    )
    with Image.open(out / "base" / "0-0.png") as im:
        assert im.info["scheduler"] == "EulerDiscreteScheduler"
    result = sample(
        "--model", tiny_model, "--prompt", "a cat", "--scheduler", "EulerDiscrete", "--out", out
    )
    assert result.exit_code == 1
    assert (
        "--scheduler EulerDiscrete: unknown scheduler — did you mean EulerDiscreteScheduler"
        in result.stderr
    )


def test_size_guidance_and_negative_prompt(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    sample_json(
        "--model", tiny_model, "--prompt", "a cat", "--height", "32", "--width", "48",
        "--guidance", "3", "--negative-prompt", "blurry", "--out", out,
    )  # fmt: skip
    with Image.open(out / "base" / "0-0.png") as im:
        assert im.size == (48, 32)
        assert (im.info["guidance"], im.info["negative_prompt"]) == ("3", "blurry")
    result = sample("--model", tiny_model, "--prompt", "a cat", "--height", "30", "--out", out)
    assert result.exit_code == 1 and "--height 30 must be a positive multiple of 8" in result.stderr


# ----------------------------------------------------------------------------------- errors


def test_edit_for_a_different_base_model_is_refused(
    erased_model: Path, tiny_model: Path, tmp_path: Path
) -> None:
    tensors = load_file(erased_model / "edit.safetensors")
    key = sorted(tensors)[0]
    meta = {"format": "uce-delta", "base_model": "other"}
    wrong_shape = {**tensors, key: torch.zeros(3, 3)}
    save_file(wrong_shape, tmp_path / "shape.safetensors", meta)
    missing = {**tensors, "unet.down_blocks.9.attn2.to_k.weight": torch.zeros(3, 3)}
    save_file(missing, tmp_path / "missing.safetensors", meta)
    for name, expected in (
        ("shape.safetensors", f"{key.removeprefix('unet.')} has shape (3, 3) vs"),
        ("missing.safetensors", "key down_blocks.9.attn2.to_k.weight is missing from its UNet"),
    ):
        result = sample(
            "--model",
            tiny_model,
            "--edit",
            tmp_path / name,
            "--prompt",
            "a",
            "--out",
            tmp_path / "o",
        )
        assert result.exit_code == 1
        assert "was made for a different base model" in result.stderr and expected in result.stderr
        assert not (tmp_path / "o").exists()


def test_edit_folder_for_a_different_base_model_is_refused(
    erased_model: Path, model_copy: Path, tmp_path: Path
) -> None:
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = tensors["conv_in.weight"] + 1
    save_file(tensors, weights)
    result = sample(
        "--model", model_copy, "--edit", erased_model, "--prompt", "a", "--out", tmp_path / "o"
    )
    assert result.exit_code == 1
    assert (
        "was made for a different base model" in result.stderr
        and "conv_in.weight differs" in result.stderr
    )


def test_unknown_edit_file_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    save_file(
        {"unet.x": torch.zeros(1)}, tmp_path / "lora.safetensors", {"format": "something-else"}
    )
    result = sample("--model", tiny_model, "--edit", tmp_path / "lora.safetensors", "--prompt", "a")
    assert result.exit_code == 1 and "unknown edit format 'something-else'" in result.stderr


def test_output_path_that_is_a_file(tiny_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    result = sample("--model", tiny_model, "--prompt", "a cat", "--out", target)
    assert result.exit_code == 1
    assert f"error: output {target} exists and is not a folder" in result.stderr
    assert target.read_text() == "x"
    inside = sample("--model", tiny_model, "--prompt", "a cat", "--out", tiny_model / "samples")
    assert inside.exit_code == 1 and "is inside the base model" in inside.stderr
    assert not (tiny_model / "samples").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "m"], "give --prompt (repeatable) or --prompts-file"),
        (["--prompt", "a"], "give --model, --edit, or both"),
        (["--model", "m", "--prompt", "a", "--compare"], "--compare needs --edit"),
    ],
)
def test_usage_errors_exit_2(args: list[str], expected: str) -> None:
    result = sample(*args)
    assert result.exit_code == 2
    assert expected in result.stderr
