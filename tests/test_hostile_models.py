"""Hostile model folders and edit files: each is one located error naming the file, never a shape
error or an internal one (issue 19 items 3 and 15)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import write_recipe
from uce_cli.cli import app
from uce_cli.errors import ModelError, UceError
from uce_cli.families.model import open_model

runner = CliRunner()

# family fixture → its denoiser and text encoder folders
FAMILIES = {
    "tiny_model": ("unet", "text_encoder"),
    "tiny_sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "tiny_flux": ("transformer", "text_encoder", "text_encoder_2"),
    "tiny_sd3": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"),
    "tiny_pixart": ("transformer", "text_encoder"),
    "tiny_sana": ("transformer", "text_encoder"),
}
BAD_INDEXES = {
    "no-weight-map": '{"metadata": {}}',
    "list": '{"weight_map": ["model.safetensors"]}',
    "not-json": '{"weight_map": {"a": ',
    "top-level-list": "[1, 2]",
    "escapes-folder": '{"weight_map": {"a": "../../unet/diffusion_pytorch_model.safetensors"}}',
    "shard-not-a-string": '{"weight_map": {"a": 3}}',
    "missing-shard": '{"weight_map": {"a": "model-00002-of-00002.safetensors"}}',
}


def _copy(request: pytest.FixtureRequest, fixture: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(request.getfixturevalue(fixture), tmp_path / fixture))


def _stem(component: str) -> str:
    return "model" if component.startswith("text_encoder") else "diffusion_pytorch_model"


def _one_line_model_error(folder: Path, *needles: str) -> str:
    with pytest.raises(ModelError) as err:
        open_model(str(folder))
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("fixture", sorted(FAMILIES))
def test_broken_sharded_index_is_one_error_naming_it(
    request: pytest.FixtureRequest, fixture: str, tmp_path: Path
) -> None:
    """Every family, the denoiser and every text encoder: each broken index names its file."""
    base = _copy(request, fixture, tmp_path)
    for component in FAMILIES[fixture]:
        index = base / component / f"{_stem(component)}.safetensors.index.json"
        for kind, text in BAD_INDEXES.items():
            index.write_text(text)
            message = _one_line_model_error(base, str(index))
            assert "KeyError" not in message and "Traceback" not in message, (kind, message)
        index.unlink()


def test_broken_index_through_the_cli(tiny_sana: Path, tmp_path: Path) -> None:
    base = Path(shutil.copytree(tiny_sana, tmp_path / "sana"))
    index = base / "text_encoder" / "model.safetensors.index.json"
    index.write_text('{"weight_map": ["x"]}')
    recipe = write_recipe(tmp_path, f"model: {base}\nerase:\n  - concepts: [a cat]\n")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith("error: ") and str(index) in result.stderr
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr


def test_valid_sharded_index_still_opens(tiny_model: Path, tmp_path: Path) -> None:
    base = Path(shutil.copytree(tiny_model, tmp_path / "sd"))
    unet = base / "unet"
    keys = list(load_file(unet / "diffusion_pytorch_model.safetensors"))
    index = {
        "metadata": {},
        "weight_map": dict.fromkeys(keys, "diffusion_pytorch_model.safetensors"),
    }
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert len(open_model(str(base)).kv) == len(open_model(str(tiny_model)).kv)


# --- components from two families -------------------------------------------------------------


def test_flux_index_with_an_sd3_transformer(
    tiny_flux: Path, tiny_sd3: Path, tmp_path: Path
) -> None:
    base = Path(shutil.copytree(tiny_flux, tmp_path / "flux"))
    shutil.rmtree(base / "transformer")
    shutil.copytree(tiny_sd3 / "transformer", base / "transformer")
    _one_line_model_error(
        base,
        "SD3Transformer2DModel",
        "FluxTransformer2DModel",
        "'transformer' component does not belong",
    )


def test_pixart_with_sanas_text_encoder(tiny_pixart: Path, tiny_sana: Path, tmp_path: Path) -> None:
    base = Path(shutil.copytree(tiny_pixart, tmp_path / "pixart"))
    shutil.rmtree(base / "text_encoder")
    shutil.copytree(tiny_sana / "text_encoder", base / "text_encoder")
    _one_line_model_error(base, "Gemma2Model", "'text_encoder' component does not belong")


def test_pixart_with_sanas_text_encoder_in_its_index_too(
    tiny_pixart: Path, tiny_sana: Path, tmp_path: Path
) -> None:
    """The class named in model_index.json follows the copied encoder: the widths still tell."""
    base = Path(shutil.copytree(tiny_sana, tmp_path / "sana"))
    shutil.rmtree(base / "transformer")
    shutil.copytree(tiny_pixart / "transformer", base / "transformer")
    index = json.loads((base / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "PixArtTransformer2DModel"]
    (base / "model_index.json").write_text(json.dumps(index))
    _one_line_model_error(base, "caption_channels = 32", "does not belong to this Sana pipeline")


def test_same_class_other_width_text_encoder(
    tiny_model: Path, tiny_sdxl: Path, tmp_path: Path
) -> None:
    """An SD folder with SDXL's second CLIP encoder (48 wide, the UNet reads 32)."""
    base = Path(shutil.copytree(tiny_model, tmp_path / "sd"))
    shutil.rmtree(base / "text_encoder")
    shutil.copytree(tiny_sdxl / "text_encoder_2", base / "text_encoder")
    _one_line_model_error(base, "48 wide", "cross_attention_dim = 32", "'text_encoder'")


# --- dtypes of editable weights -----------------------------------------------------------------


def _retype_kv(base: Path, dtype: torch.dtype) -> str:
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if k.endswith("attn2.to_k.weight"))[0]
    tensors[key] = (tensors[key] * 100).to(dtype)
    save_file(tensors, weights)
    return key


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2"), (torch.int64, "I64")],
)
def test_float8_and_integer_editable_weights_are_refused(
    tiny_model: Path, tmp_path: Path, dtype: torch.dtype, name: str
) -> None:
    base = Path(shutil.copytree(tiny_model, tmp_path / "sd"))
    key = _retype_kv(base, dtype)
    _one_line_model_error(base, key, f"stored as {name}")
    recipe = write_recipe(tmp_path, f"model: {base}\nerase:\n  - concepts: [a cat]\n")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and f"stored as {name}" in result.stderr, result.stderr
    assert "Promotion" not in result.stderr and not (tmp_path / "out").exists()


# --- uce sample --edit: values of the edit ------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "int64"])
def test_sample_edit_with_nonfinite_or_integer_tensor_is_refused(
    erased_model: Path, tiny_model: Path, tmp_path: Path, bad: str
) -> None:
    source = erased_model / "edit.safetensors"
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(source)
    key = sorted(tensors)[1]
    if bad == "int64":
        tensors[key] = tensors[key].round().to(torch.int64)
    else:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float(bad)
    save_file(tensors, tmp_path / "edit.safetensors", meta)
    result = runner.invoke(
        app,
        ["sample", "--steps", "2", "--quiet", "--model", str(tiny_model), "--edit",
         str(tmp_path / "edit.safetensors"), "--prompt", "a", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert result.exit_code == 1, result.stderr
    assert str(tmp_path / "edit.safetensors") in result.stderr
    assert key.removeprefix("unet.") in result.stderr
    assert ("int64" if bad == "int64" else "NaN/inf") in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_check_edit_values_accepts_a_real_edit(erased_model: Path, tiny_model: Path) -> None:
    from uce_cli.artifacts.edits import load_edit_tensors

    edit = load_edit_tensors(erased_model / "edit.safetensors", open_model(str(tiny_model)))
    assert edit.tensors and all(t.is_floating_point() for t in edit.tensors.values())
    with pytest.raises(UceError):
        from uce_cli.artifacts.edits import check_edit_values

        check_edit_values(Path("x"), {"k": torch.tensor([float("nan")])})


# --- uce sample: settings a family's pipeline rejects -------------------------------------------


def _sample(model: Path, out: Path, *args: str) -> object:
    return runner.invoke(
        app,
        ["sample", "--quiet", "--model", str(model), "--prompt", "a cat", "--out", str(out), *args],
    )


def test_pixart_one_step_is_refused_in_one_line(tiny_pixart: Path, tmp_path: Path) -> None:
    """One step (with --guidance 0, as found, or any guidance) took the DMD path: IndexError."""
    for guidance in ("0", "4.5"):
        result = _sample(tiny_pixart, tmp_path / "o", "--steps", "1", "--guidance", guidance)
        assert result.exit_code == 1, result.stderr
        assert result.stderr.startswith("error: --steps 1: the PixArt-α pipeline")
        assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr
        assert not (tmp_path / "o").exists()
    done = _sample(tiny_pixart, tmp_path / "ok", "--steps", "2", "--guidance", "0", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["generated"] == 1


def test_sana_size_not_divisible_by_32_is_refused(tiny_sana: Path, tmp_path: Path) -> None:
    result = _sample(tiny_sana, tmp_path / "o", "--steps", "2", "--height", "16")
    assert result.exit_code == 1, result.stderr
    assert result.stderr == (
        "error: --height 16: Sana pipelines need a height and width divisible by 32 — use e.g. "
        "--height 32\n"
    )
    assert not (tmp_path / "o").exists()
    done = _sample(tiny_sana, tmp_path / "ok", "--steps", "2", "--height", "64")
    assert done.exit_code == 0, done.stderr
