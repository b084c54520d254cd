"""A run folder is input: `uce eval`, `uce show` and `--samples` read what an attacker (or an
accident) can put there — paths in the log, fields of the wrong shape, hostile JSON and images —
and answer with one line naming the file, never a traceback, a wrong result or a file elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import apply_recipe
from uce_cli.cli import app

runner = CliRunner()

PROMPTS = """prompt,artist,type
Image in the style of Kelly Mckernan,Kelly Mckernan,erased
Art inspired by Thomas Kinkade,Thomas Kinkade,erased
Image in the style of Claude Monet,Claude Monet,preserved
a cat on a sofa,,other
"""
BODY = """erase:
  - concepts_file: artists.txt
    templates: art
preserve:
  - concepts: [Claude Monet]
evaluate:
  heldout:
    - {file: prompts.csv, concept_column: artist, where: {type: erased}}
  unrelated:
    - {file: prompts.csv, where: {type: other}}
"""


def cli(*args: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _recipe_folder(folder: Path, artists: str, model: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "artists.txt").write_text(artists)
    (folder / "prompts.csv").write_text(PROMPTS)
    (folder / "recipe.yaml").write_text(f"model: {model}\n{BODY}")
    return folder / "recipe.yaml"


def _edited(run: Path) -> set[str]:
    return set(json.loads((run / "eval" / "eval.json").read_text())["text"]["concepts"]["edited"])


# --- item 2: relative paths of a recipe are relative to the recipe, never the working folder ---


def test_eval_reads_the_recipes_files_from_its_folder_not_the_working_folder(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _recipe_folder(tmp_path / "a" / "rec", "Kelly Mckernan\nThomas Kinkade\n", tiny_model)
    # another folder holding a recipe of the same name and a different rec/artists.txt
    _recipe_folder(tmp_path / "b" / "rec", "Claude Monet\n", tiny_model)
    monkeypatch.chdir(tmp_path / "a")
    applied = cli("apply", "rec/recipe.yaml", "--out", "rec/out", "-q")  # a relative recipe path
    assert applied.exit_code == 0, applied.stderr
    run = tmp_path / "a" / "rec" / "out"
    monkeypatch.chdir(tmp_path / "b")
    result = cli("eval", run, "-q", "--no-plots")
    assert result.exit_code == 0, result.stderr
    assert _edited(run) == {"Kelly Mckernan", "Thomas Kinkade"}

    # a log of an older uce (no recipe_folder): found from paths.output, still not from the cwd
    log = json.loads((run / "edit_log.json").read_text())
    del log["recipe_folder"]
    assert log["recipe_file"] == "rec/recipe.yaml" and log["paths"]["output"] == "out"
    (run / "edit_log.json").write_text(json.dumps(log))
    result = cli("eval", run, "-q", "--no-plots", "--force")
    assert result.exit_code == 0, result.stderr
    assert _edited(run) == {"Kelly Mckernan", "Thomas Kinkade"}


# --- item 14: paths in a log are checked against the run's and the recipe's folders ------------


def _crafted(erased_model: Path, tmp_path: Path, **recipe_changes: object) -> Path:
    run = tmp_path / "run"
    shutil.copytree(erased_model, run)
    log = json.loads((run / "edit_log.json").read_text())
    log.update(recipe_changes.pop("top", {}))
    if recipe_changes:
        log["recipe"].update(recipe_changes)
    (run / "edit_log.json").write_text(json.dumps(log))
    return run


def test_a_crafted_log_cannot_read_a_file_outside_the_run_into_the_report(
    erased_model: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOPSECRET-NAME\n")
    for n, changes in enumerate(
        [
            {"erase": [{"concepts_file": str(secret)}]},  # an absolute path
            {"erase": [{"concepts_file": "../../../../../../../" + str(secret)}]},  # ../ escape
            # the log claims the recipe lived beside the file (no recipe is there)
            {
                "erase": [{"concepts_file": "secret.txt"}],
                "top": {"recipe_folder": str(secret.parent), "recipe_file": "secret.yaml"},
            },
            {  # an evaluate: of the log's own (no recipe file where the log says)
                "evaluate": {"heldout": [{"file": str(secret), "concept": "Kelly Mckernan"}]},
                "top": {"recipe_folder": str(tmp_path / "nowhere"), "recipe_file": "r.yaml"},
            },
        ]
    ):
        run = _crafted(erased_model, tmp_path / f"c{n}", **changes)
        result = cli("eval", run, "-q", "--no-plots")
        one_line_error(result, "outside", "a run folder is input")
        assert not (run / "eval").exists()
        assert "TOPSECRET" not in result.stdout + result.stderr


def test_a_path_the_recipe_itself_names_outside_its_folder_is_read(
    tiny_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "artists.txt").write_text("Kelly Mckernan\n")
    folder = tmp_path / "recipes"
    recipe = _recipe_folder(folder, "", tiny_model)
    recipe.write_text(recipe.read_text().replace("artists.txt", "../data/artists.txt"))
    run = apply_recipe(tiny_model, folder, body=BODY.replace("artists.txt", "../data/artists.txt"))
    result = cli("eval", run, "-q", "--no-plots")
    assert result.exit_code == 0, result.stderr
    assert _edited(run) == {"Kelly Mckernan"}


# --- item 15: the edit is judged against the base it was made for -----------------------------


def test_eval_refuses_an_edit_made_for_another_base(
    erased_model: Path, model_copy: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("attn2.to_k.weight"))
    tensors[key] = tensors[key] * 1.5  # another base: the same shapes, other k/v weights
    save_file(tensors, weights)
    run = _crafted(erased_model, tmp_path, top={})
    log = json.loads((run / "edit_log.json").read_text())
    log["base_model"]["spec"] = str(model_copy)
    (run / "edit_log.json").write_text(json.dumps(log))
    result = cli("eval", run, "-q", "--no-plots")
    one_line_error(result, "the edit was made for another base", "k/v sha256")


# --- item 4: fields of the wrong shape, deep nesting, files of the wrong kind ------------------

DEEP = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("layers", [1, 2], "field layers"),
        ("base_model", "sd", "field base_model"),
        ("recipe", "erase everything", "field recipe"),
        ("recipe_file", 42, "field recipe_file"),
        ("timings", {"solve": "fast"}, "field timings.solve"),
        ("paths", ["a", "b"], "field paths"),
        ("debias", {"iterations": "many"}, "field debias.iterations"),
    ],
)
def test_edit_log_fields_of_the_wrong_shape(
    erased_model: Path, tmp_path: Path, field: str, value: object, where: str
) -> None:
    run = _crafted(erased_model, tmp_path, top={field: value})
    for command in (("show", run), ("eval", run, "-q", "--no-plots")):
        one_line_error(cli(*command), f"{run / 'edit_log.json'}: not a uce edit log: {where}")


def test_edit_log_nested_50k_deep_and_of_the_wrong_kind(erased_model: Path, tmp_path: Path) -> None:
    run = _crafted(erased_model, tmp_path, top={})
    (run / "edit_log.json").write_text(DEEP)
    for command in (("show", run), ("eval", run, "-q")):
        one_line_error(cli(*command), "edit_log.json: JSON nested too deeply")
    (run / "edit_log.json").unlink()
    (run / "edit_log.json").mkdir()
    one_line_error(cli("show", run), "edit_log.json: not a file")


def test_eval_json_of_the_wrong_shape_or_kind(erased_model: Path, tmp_path: Path) -> None:
    run = _crafted(erased_model, tmp_path, top={})
    assert cli("eval", run, "-q", "--no-plots").exit_code == 0
    report_file = run / "eval" / "eval.json"
    report = json.loads(report_file.read_text())
    for bad, where in (
        ({**report, "figures": {"efficacy": "0.9"}}, "field figures.efficacy"),
        ({**report, "text": {"figures": ["efficacy"]}}, "field text.figures"),
        ({**report, "expect": {"efficacy": 1}}, "field expect"),
        ({**report, "figures": {"efficacy": {"value": 1}}}, "field figures.efficacy"),
    ):
        report_file.write_text(json.dumps(bad))
        one_line_error(cli("show", run), "eval.json: not a uce eval report", where)
        one_line_error(cli("eval", run, "--check", "--allow-empty", "-q"), where)
    report_file.write_text(DEEP)
    one_line_error(cli("show", run), "eval.json: JSON nested too deeply")
    # eval.json a folder, eval/ a file: said, with --force too
    report_file.unlink()
    report_file.mkdir()
    one_line_error(cli("show", run), "eval.json: not a regular file")
    one_line_error(cli("eval", run, "--force", "-q", "--no-plots"), "eval.json: not a regular file")
    shutil.rmtree(run / "eval")
    (run / "eval").write_text("not a folder")
    one_line_error(cli("eval", run, "--force", "-q", "--no-plots"), "eval: not a folder")
    one_line_error(cli("show", run), "eval: not a folder")


# --- item 4 (--samples) and item 17: manifests and images --------------------------------------

CSV = """case_number,prompt,class,evaluation_seed
0,an image of a tench,tench,11
1,an image of a church,church,12
"""


@pytest.fixture(scope="module")
def sampled(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run whose evaluate: asks for clip_score, and a `uce sample --compare` folder for it."""
    folder = tmp_path_factory.mktemp("sampled")
    (folder / "objects.csv").write_text(CSV)
    body = """erase:
  - concepts: [tench]
    templates: object
evaluate:
  images:
    prompts: {file: objects.csv, concept_column: class}
    steps: 1
  metrics: [clip_score]
  clip_model: not-a-model-here/clip
"""
    run = apply_recipe(tiny_model, folder, body=body)
    samples = folder / "s"
    made = cli("sample", "--edit", run, "--compare", "--prompts-file", folder / "objects.csv",
               "--steps", "1", "--out", samples, "-q")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    return run, samples


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header says width × height (the pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_sample_manifests_of_the_wrong_shape(sampled: tuple[Path, Path], tmp_path: Path) -> None:
    run, original = sampled
    samples = tmp_path / "s"
    shutil.copytree(original, samples)
    manifest = json.loads((samples / "manifest.json").read_text())
    for bad, where in (
        ({**manifest, "settings": "steps 1"}, "field settings"),
        ({**manifest, "images": {"a": 1}}, "field images"),
        ({**manifest, "settings": {**manifest["settings"], "steps": 1}}, "field settings.steps"),
        ({**manifest, "images": [{"path": 5}]}, "field images.0.path"),
        ({**manifest, "images": [{"path": "../../etc/passwd"}]}, "field images.0.path"),
    ):
        (samples / "manifest.json").write_text(json.dumps(bad))
        result = cli("eval", run, "--samples", samples, "-q", "--no-plots", "--force")
        one_line_error(result, "manifest.json: not a uce sample manifest", where)
    (samples / "manifest.json").write_text(DEEP)
    result = cli("eval", run, "--samples", samples, "-q", "--no-plots", "--force")
    one_line_error(result, "manifest.json: JSON nested too deeply")


@pytest.mark.parametrize("kind", ["truncated", "not-an-image", "symlink", "bomb"])
def test_hostile_images_in_a_sample_folder(
    sampled: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    run, original = sampled
    samples = tmp_path / "s"
    shutil.copytree(original, samples)
    image = samples / "edited" / "0-11.png"
    data = image.read_bytes()
    image.unlink()
    if kind == "truncated":
        image.write_bytes(data[: len(data) // 2])
    elif kind == "not-an-image":
        image.write_text("hello, I am text\n")
    elif kind == "symlink":
        os.symlink("/etc/passwd", image)
    else:
        image.write_bytes(_png_with_size(20_000, 20_000))
    expected = {
        "truncated": "truncated or not a readable image",
        "not-an-image": "truncated or not a readable image",
        "symlink": "a symlink to /etc/passwd",
        "bomb": "decompression bomb",
    }[kind]
    result = cli("eval", run, "--samples", samples, "-q", "--no-plots", "--force")
    one_line_error(result, str(image), expected)


def test_resuming_a_sample_folder_names_a_truncated_image(
    sampled: tuple[Path, Path], tmp_path: Path
) -> None:
    run, original = sampled
    samples = tmp_path / "s"
    shutil.copytree(original, samples)
    image = samples / "base" / "1-12.png"
    image.write_bytes(image.read_bytes()[:100])
    again = cli("sample", "--edit", run, "--compare", "--prompts-file", run.parent / "objects.csv",
                "--steps", "1", "--out", samples, "-q")  # fmt: skip
    one_line_error(again, str(image), "truncated or not a readable image")
    assert "other settings" not in again.stderr
