"""Single-file (LDM/A1111) checkpoints: key mapping both ways, diffusers' own loader, single-file input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import ERASE_RECIPE, apply_recipe, write_recipe
from uce_cli.cli import app
from uce_cli.families import sd_singlefile as checkpoint
from uce_cli.families.model import open_model
from uce_cli.families.sd_singlefile import (
    UNET_PREFIX,
    kv_key_from_ldm,
    kv_key_to_ldm,
    read_single_file_kv,
    unet_key_to_ldm,
    vae_key_to_ldm,
)

runner = CliRunner()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def single(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as an A1111-style single file (naming the tiny folder as its config)."""
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    checkpoint.write_single_file(path, tiny_model, {}, {"config": str(tiny_model)})
    return path


@pytest.fixture(scope="module")
def edited(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return apply_recipe(tiny_model, tmp_path_factory.mktemp("edited"), ["diffusers", "single-file"])


def test_kv_mapping_sd1_layout_both_ways() -> None:
    # SD 1.x: layers_per_block 2 → stride 3 (the and diffusers' scripts' numbering).
    tail = "transformer_blocks.0.attn2.to_k.weight"
    expected = {
        f"down_blocks.0.attentions.0.{tail}": f"input_blocks.1.1.{tail}",
        f"down_blocks.0.attentions.1.{tail}": f"input_blocks.2.1.{tail}",
        f"down_blocks.2.attentions.1.{tail}": f"input_blocks.8.1.{tail}",
        f"mid_block.attentions.0.{tail}": f"middle_block.1.{tail}",
        f"up_blocks.1.attentions.0.{tail}": f"output_blocks.3.1.{tail}",
        f"up_blocks.3.attentions.2.{tail}": f"output_blocks.11.1.{tail}",
    }
    for diffusers_key, ldm in expected.items():
        assert kv_key_to_ldm(diffusers_key, 3) == UNET_PREFIX + ldm
        assert kv_key_from_ldm(UNET_PREFIX + ldm, 3) == diffusers_key
        assert unet_key_to_ldm(diffusers_key, 2, [False, True, True, True]) == ldm
    assert (
        kv_key_from_ldm(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", 3)
        is None
    )


def test_full_mapping_matches_diffusers_own_converter() -> None:
    """Our diffusers→LDM names, fed to diffusers' LDM→diffusers converter, come back unchanged (SD 1.x and tiny)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from uce_cli.weights.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline()
    with torch.device("meta"):
        sd1_unet = UNet2DConditionModel(cross_attention_dim=768)  # defaults are SD 1.x's layout
        sd1_vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    for unet in (sd1_unet, tiny.unet):
        cfg = dict(unet.config)
        up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
        keys = list(unet.state_dict())
        ldm = {
            UNET_PREFIX + unet_key_to_ldm(k, cfg["layers_per_block"], up_attn): torch.tensor([i])
            for i, k in enumerate(keys)
        }
        assert len(ldm) == len(keys)  # injective
        back = convert_ldm_unet_checkpoint(ldm, cfg)
        assert {k: int(v) for k, v in back.items()} == {k: i for i, k in enumerate(keys)}
    for vae in (sd1_vae, tiny.vae):
        keys = list(vae.state_dict())
        n = len(vae.config["block_out_channels"])
        ldm = {
            "first_stage_model." + vae_key_to_ldm(k, n): torch.tensor([i])
            for i, k in enumerate(keys)
        }
        assert len(ldm) == len(keys)
        back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
        assert {k: int(v) for k, v in back.items()} == {k: i for i, k in enumerate(keys)}


def test_single_file_output_loads_with_diffusers_from_single_file(
    edited: Path, tiny_model: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(edited / "model.safetensors"),
        config=str(tiny_model),
        local_files_only=True,
        safety_checker=None,
    )
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    patched = open_model(str(edited)).read_kv()
    unet = pipe.unet.state_dict()
    for key, value in base.unet.state_dict().items():
        assert torch.equal(unet[key], patched.get(key, value)), key
    for name in ("vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in theirs.items()), name


def test_single_file_input_gives_a_patched_copy(
    single: Path, tiny_model: Path, edited: Path, tmp_path: Path
) -> None:
    out = apply_recipe(single, tmp_path, ["single-file", "diffusers", "delta"])
    src, dst = out / "model.safetensors", single
    with safe_open(str(src), "pt") as a, safe_open(str(dst), "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]  # noqa: SIM118
    assert len(changed) == 14 and all(".attn2.to_" in k for k in changed)
    reference = open_model(str(edited)).read_kv()
    # The output single file opened as a model is the edited model, not the cached base.
    for got in (
        read_single_file_kv(src),
        open_model(str(out)).read_kv(),
        open_model(str(src)).read_kv(),
    ):
        assert max(rel(got[k], w) for k, w in reference.items()) < 1e-6
    # The cached conversion the edit ran on is the base, weight for weight.
    model = open_model(str(single))
    assert model.single_file == single
    for sub in (
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ):
        ours, base = (
            load_file(model.root / f"{sub}.safetensors"),
            load_file(tiny_model / f"{sub}.safetensors"),
        )
        assert all(torch.equal(ours[k], v) for k, v in base.items()), sub


def test_pickle_checkpoint_needs_allow_pickle(
    single: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(single)}, ckpt)
    recipe = write_recipe(tmp_path, f"model: {ckpt}\n{ERASE_RECIPE}")
    refused = runner.invoke(
        app, ["apply", str(recipe), "--out", str(tmp_path / "a"), "--format", "delta"]
    )
    assert (
        refused.exit_code == 1
        and "--allow-pickle" in refused.stderr
        and not (tmp_path / "a").exists()
    )
    # A pickle names no config, so the default one is used: point it at the tiny model.
    monkeypatch.setattr(checkpoint, "SD1_CONFIG", str(tiny_model))
    ok = runner.invoke(
        app,
        ["apply", str(recipe), "--out", str(tmp_path / "a"), "--format", "delta", "--allow-pickle"],
    )
    assert ok.exit_code == 0, ok.stderr
    assert len(load_file(tmp_path / "a" / "edit.safetensors")) == 14


def test_bad_single_files_are_refused(single: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(single.read_bytes()[:100])
    sd2 = tmp_path / "sd2.safetensors"
    state = load_file(single)
    state["cond_stage_model.model.ln_final.weight"] = torch.ones(4)
    save_file(state, str(sd2), {"config": "ignored"})
    unet_only = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.x": torch.ones(1)}, str(unet_only))
    # An OpenCLIP (SD 2.x) file is read (issue 11); naming no config it can use, it needs SD 2.1's
    # configs from the Hub, which an offline machine does not have: one line saying so.
    for path, needle in (
        (corrupt, "corrupt"),
        (sd2, "pipeline config 'stabilityai/stable-diffusion-2-1'"),
        (unet_only, "checkpoint"),
    ):
        result = runner.invoke(app, ["verify", str(path), "--against", str(single)])
        result2 = runner.invoke(
            app, ["merge", str(path), str(single), "--out", str(tmp_path / "o")]
        )
        assert result2.exit_code == 1 and needle in result2.stderr, (needle, result2.stderr)
        if path != sd2:  # verify reads only k/v tensors, which SD 2.x files share
            assert result.exit_code == 1 and needle in result.stderr, (needle, result.stderr)
