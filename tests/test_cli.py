"""The CLI contract: exit codes, stdout for results, `error: …` on stderr, nothing written on error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.artifacts.outputs import sha256_file
from uce_cli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_error(result, *needles: str, code: int = 1) -> None:  # noqa: ANN001
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def recipe_for(model: Path | str, body: str = "erase:\n  - concepts: [Kinkade]\n") -> str:
    return f"model: {model}\n{body}"


def test_version_and_help() -> None:
    assert run("--version").stdout.strip() == "uce 0.1.0"
    result = run("--help")
    assert result.exit_code == 0
    for command in ("validate", "apply", "show"):
        assert command in result.stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("apply").exit_code == 2
    assert run("apply", tmp_path / "r.yaml", "--device", "tpu").exit_code == 2
    assert run("apply", tmp_path / "r.yaml", "--bogus").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_validate_reports_each_file(tmp_path: Path) -> None:
    good = write_recipe(tmp_path, recipe_for("builtin:tiny-sd"), "good.yaml")
    bad = write_recipe(tmp_path, "model: m\nalignment: x\nerase:\n  - concepts: []\n", "bad.yaml")
    result = run("validate", good, bad)
    assert result.exit_code == 1
    assert f"ok {good}: 1 edit prompt, 1 preserve prompt, paper alignment" in result.stdout
    assert f"error: {bad}: alignment: must be 'paper' or 'last-token' (got 'x')" in result.stderr
    assert f"error: {bad}: erase.0.concepts: empty concept list" in result.stderr
    result = run("validate", good, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)[0]["ok"] is True


def test_validate_does_not_import_torch(tmp_path: Path) -> None:
    good = write_recipe(tmp_path, recipe_for("builtin:tiny-sd"))
    code = (
        "import sys\nfrom uce_cli.cli import app\n"
        f"try:\n    app(['validate', {str(good)!r}])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'validate imported torch'\nprint('no torch')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "no torch" in done.stdout


def test_every_shipped_recipe_validates() -> None:
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        head = recipe.read_text().splitlines()[:12]
        assert head[0].startswith("# "), f"{recipe.name} must open with a comment"
        assert any(line.startswith("# Run: uce ") for line in head), (
            f"{recipe.name}: no run command"
        )
    result = run("validate", *recipes)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("ok ") == len(recipes)


def test_apply_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        recipe_for(
            tiny_model,
            "erase:\n  - concepts: [Kelly Mckernan]\n    templates: art\n"
            "preserve:\n  - concepts: [Claude Monet]\n",
        ),
    )
    out = tmp_path / "out"
    result = run("apply", recipe, "--out", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(out)
    assert "edit residual (worst layer)" in result.stdout
    assert result.stderr == ""  # --quiet
    log = json.loads((out / "edit_log.json").read_text())
    assert log["plan"]["edit_prompts"] == 6 and log["plan"]["preserve_prompts"] == 2
    assert len(log["layers"]) == 14
    for figures in log["layers"].values():
        assert figures["residual_after"] < figures["residual_before"]
        assert 0 < figures["rel_delta"] and figures["preserve_drift"] >= 0
    assert set(log["timings"]) == {"load", "encode", "solve", "save", "hash_and_log"}
    assert set(log["versions"]) >= {"uce", "torch", "diffusers", "transformers"}
    assert "unet/diffusion_pytorch_model.safetensors" in log["outputs"]
    assert log["plan"]["pairs"][0]["source_start"] >= 1
    delta_meta = __import__("safetensors").safe_open(str(out / "edit.safetensors"), "pt").metadata()
    assert delta_meta["recipe_sha256"] == log["recipe_sha256"]
    assert delta_meta["uce_version"] == "0.1.0"
    assert (
        delta_meta["text_encoder_weights_sha256"]
        == log["base_model"]["text_encoder_weights_sha256"]
    )
    # hashes computed while copying equal a fresh read of every file, base and output alike
    for rel, digest in log["outputs"].items():
        assert sha256_file(out / rel) == digest, rel
    for rel, digest in log["base_model"]["files"].items():
        assert sha256_file(tiny_model / rel) == digest, rel
    assert len(log["base_model"]["kv_weights_sha256"]) == 64
    assert set(log["outputs"]) >= {"model_index.json", "vae/config.json", "edit.safetensors"}
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the staging folder's private 0700

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    edited = load_file(str(out / "edit.safetensors"))
    key = next(iter(edited))
    module_key = key.removeprefix("unet.")
    assert (pipe.unet.state_dict()[module_key] == edited[key]).all()

    shown = run("show", out)
    assert shown.exit_code == 0 and "residual" in shown.stdout and "drift" in shown.stdout
    as_json = json.loads(run("show", out / "edit_log.json", "--json").stdout)
    assert as_json["recipe_sha256"] == log["recipe_sha256"]

    again = run("apply", recipe, "--out", out, "--device", "cpu", "--quiet")
    assert_error(again, "already exists — pass --force")
    forced = run("apply", recipe, "--out", out, "--device", "cpu", "--quiet", "--json", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(forced.stdout)["out"] == str(out)
    assert not [p for p in tmp_path.iterdir() if ".uce-" in p.name]  # no staging leftovers


def test_dry_run_prints_plan_and_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, recipe_for(tiny_model, "erase:\n  - concepts: [Kinkade]\n    templates: art\n")
    )
    result = run("apply", recipe, "--dry-run", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "nothing will be written" in result.stdout
    assert "'painting by Kinkade' → 'art'" in result.stdout
    assert "vectors:" in result.stdout
    report = json.loads(run("apply", recipe, "--dry-run", "--json").stdout)
    assert report["edit_prompts"] == 6 and report["vectors"]["per_preserve_prompt"] == 77
    assert not (tmp_path / "out").exists()


def no_cross_attention_model(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    weights = dest / "unet/diffusion_pytorch_model.safetensors"
    tensors = {k.replace("attn2", "attnX"): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    return dest


BAD_RECIPES = {
    "yaml syntax": ("model: m\nerase: [\n", "line 3, column 1: YAML syntax error"),
    "not a mapping": ("- a\n- b\n", "not a mapping"),
    "unknown key": (
        "model: m\nerase:\n  - concepts: [x]\nerasee: 1\n",
        "(top level): unknown key `erasee` — did you mean `erase`?",
    ),
    "wrong type": (
        "model: m\nerase:\n  - concepts: [x]\nseed: abc\n",
        "seed: must be a whole number (got 'abc')",
    ),
    "empty concepts": (
        "model: m\nerase:\n  - concepts: []\n",
        "erase.0.concepts: empty concept list",
    ),
    "no edit": ("model: m\npreserve:\n  - concepts: [x]\n", "no edit section"),
    "both": (
        "model: m\nerase:\n  - concepts: [x]\npreserve:\n  - concepts: [x]\n",
        "both preserved and edited",
    ),
    "guide count": (
        "model: m\nerase:\n  - concepts: [a, b, c]\n    guide: [x, y]\n",
        "2 guides for 3 concepts",
    ),
    "file missing": ("model: m\nerase:\n  - concepts_file: none.txt\n", "none.txt does not exist"),
    "column absent": (
        "model: m\nerase:\n  - concepts_file: c.csv\n    column: nope\n",
        "has no column 'nope'",
    ),
    "alignment": (
        "model: m\nalignment: token\nerase:\n  - concepts: [x]\n",
        "alignment: must be 'paper' or 'last-token' (got 'token')",
    ),
    "negative lambda": (
        "model: m\nerase:\n  - concepts: [x]\nsolver: {lambda: -0.5}\n",
        "solver.lambda",
    ),
    "negative scale": (
        "model: m\nerase:\n  - concepts: [x]\nsolver: {preserve_scale: -1}\n",
        "must be >= 0",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_RECIPES))
def test_bad_recipe_is_a_clear_error(name: str, tmp_path: Path) -> None:
    text, needle = BAD_RECIPES[name]
    (tmp_path / "c.csv").write_text("a,b\n1,2\n")
    recipe = write_recipe(tmp_path, text)
    for command in (["validate", recipe], ["apply", recipe, "--out", tmp_path / "out"]):
        result = run(*command)
        assert_error(result, needle, str(recipe))
    assert not (tmp_path / "out").exists()


def test_missing_and_binary_recipe(tmp_path: Path) -> None:
    assert_error(run("apply", tmp_path / "nope.yaml"), "nope.yaml: no such file")
    binary = tmp_path / "r.yaml"
    binary.write_bytes(bytes(range(256)))
    assert_error(run("apply", binary), "not a UTF-8 text file")


def test_model_errors(tiny_model: Path, tmp_path: Path) -> None:
    missing = write_recipe(tmp_path, recipe_for("./no/such/model"), "a.yaml")
    assert_error(run("apply", missing, "--out", tmp_path / "o1"), "does not exist — check the path")
    not_pipeline = write_recipe(tmp_path, recipe_for(tmp_path), "b.yaml")
    assert_error(
        run("apply", not_pipeline, "--out", tmp_path / "o2"), "not a diffusers pipeline folder"
    )
    broken = no_cross_attention_model(tiny_model, tmp_path / "no-xattn")
    no_xattn = write_recipe(tmp_path, recipe_for(broken), "c.yaml")
    assert_error(run("apply", no_xattn, "--out", tmp_path / "o3"), "has no cross-attention layers")
    offline_hub = write_recipe(tmp_path, recipe_for("nobody/nothing-here"), "d.yaml")
    assert_error(
        run("apply", offline_hub, "--out", tmp_path / "o4"),
        "cannot fetch model 'nobody/nothing-here'",
    )
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_pickle_only_weights_refused(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    model = Path(shutil.copytree(tiny_model, tmp_path / "pickled"))
    weights = model / "unet/diffusion_pytorch_model.safetensors"
    weights.rename(model / "unet/diffusion_pytorch_model.bin")
    recipe = write_recipe(tmp_path, recipe_for(model))
    assert_error(
        run("apply", recipe, "--out", tmp_path / "out"), "only pickle weights", "convert them"
    )


def test_too_long_prompt_refused(tiny_model: Path, tmp_path: Path) -> None:
    long_concept = " ".join(["Kinkade"] * 20)
    recipe = write_recipe(
        tmp_path, recipe_for(tiny_model, f"erase:\n  - concepts: [{long_concept}]\n")
    )
    result = run("apply", recipe, "--out", tmp_path / "out")
    assert_error(
        result, "erase.0: prompt 'Kinkade Kinkade", "tokens, more than the text encoder's 77"
    )
    assert not (tmp_path / "out").exists()


def test_output_inside_base_refused(model_copy: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for(model_copy))
    before = sorted(p.name for p in model_copy.iterdir())
    for out in (model_copy / "edited", model_copy, tmp_path):
        result = run("apply", recipe, "--out", out, "--force")
        assert_error(result, "overlaps the base model folder")
    assert sorted(p.name for p in model_copy.iterdir()) == before


def test_output_is_a_file(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for(tiny_model))
    (tmp_path / "file").write_text("x")
    assert_error(
        run("apply", recipe, "--out", tmp_path / "file", "--force"), "exists and is not a folder"
    )


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, recipe_for("./missing"))
    result = run("apply", recipe, "--out", tmp_path / "out", env={**os.environ, "UCE_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "model: local path" in result.stderr


def test_show_errors(tmp_path: Path) -> None:
    assert_error(run("show", tmp_path), "no edit log here")
    (tmp_path / "edit_log.json").write_text("{not json")
    assert_error(run("show", tmp_path), "not a readable JSON edit log")


def test_show_a_merge_log(tiny_model: Path, erased_model: Path, tmp_path: Path) -> None:
    """Logs of merge/transfer have no residuals; show prints what is there, never crashes."""
    merged = tmp_path / "merged"
    result = run("merge", tiny_model, erased_model / "edit.safetensors", "--out", merged, "--quiet")
    assert result.exit_code == 0, result.stderr
    shown = run("show", merged)
    assert shown.exit_code == 0, shown.stderr
    assert "—" in shown.stdout and "layers" in shown.stdout
