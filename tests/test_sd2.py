"""SD 2.x (issue 11): detection, vectors equal to the pipeline's, float64 parity in both alignment
modes, every output loaded by diffusers (from_pretrained, load_lora_weights, from_single_file),
single-file input, sampling, and the refusals (missing component, mixed families in transfer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from tests.conftest import ERASE_RECIPE, apply_recipe, write_recipe
from tests.test_solve import Reference, kv_weights, rel
from uce_cli.cli import app
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe
from uce_cli.families.model import open_model, open_text_path
from uce_cli.families.sd_singlefile import OPEN_CLIP_PREFIX, write_single_file

runner = CliRunner()
ALL_FORMATS = ["diffusers", "delta", "lora", "lora-kohya", "single-file", "operator"]


def pipeline(folder: Path):  # noqa: ANN201
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)


@pytest.fixture(scope="module")
def edited_sd2(tiny_sd2_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The erase every format test shares, applied to the tiny SD 2.x model in every format."""
    return apply_recipe(tiny_sd2_model, tmp_path_factory.mktemp("sd2-edit"), ALL_FORMATS)


@pytest.fixture(scope="module")
def sd2_single(tiny_sd2_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 2.x model as an OpenCLIP-layout single file (naming its folder as config)."""
    path = tmp_path_factory.mktemp("sd2-single") / "tiny-sd2.safetensors"
    write_single_file(path, tiny_sd2_model, {}, {"config": str(tiny_sd2_model)})
    return path


def test_families_detected_from_the_text_encoder(tiny_model: Path, tiny_sd2_model: Path) -> None:
    sd1, sd2 = open_model(str(tiny_model)), open_model(str(tiny_sd2_model))
    assert (sd1.family.name, sd2.family.name) == ("sd1", "sd2")
    assert [(g.name, g.width) for g in sd1.groups] == [("text", 32)]
    assert [(g.name, g.width) for g in sd2.groups] == [("text", 48)]
    assert len(sd2.kv) == 14 and {t.projection for t in sd2.kv} == {"to_k", "to_v"}
    assert all(t.group == "text" and t.shape[1] == 48 for t in sd2.kv)


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_vectors_equal_what_the_pipeline_feeds_the_unet(
    which: str, tiny_model: Path, tiny_sd2_model: Path
) -> None:
    folder = tiny_model if which == "sd1" else tiny_sd2_model
    prompts = ["painting by Kelly Mckernan", "", "a photo of a dog in the city"]
    text_path = open_text_path(open_model(str(folder)), torch.device("cpu"), torch.float32)
    ours = text_path.encode(prompts)["text"]
    pipe = pipeline(folder)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert torch.equal(ours, theirs)
    tokens = text_path.tokens(prompts)["text"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77).input_ids
    for prompt, row in zip(prompts, ids, strict=True):
        t = tokens[prompt]
        assert t.seen == 77 and row[t.last_word + 1] == pipe.tokenizer.eos_token_id  # EOS follows
        assert t.last_word == (0 if prompt == "" else t.n_tokens - 2)


@pytest.mark.parametrize("mode", ["paper", "last-token"])
def test_sd2_parity_with_float64_reference(mode: str, tiny_sd2_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"""
model: {tiny_sd2_model}
alignment: {mode}
erase:
  - concepts: [Kelly Mckernan, Kinkade]
    templates: ["painting by {{}}", "{{}}"]
    guide: art
moderate:
  - concepts: [nudity]
debias:
  - concepts: [doctor]
    attributes: [male, female]
    alphas: {{male: 0.3, female: 0.2}}
    alpha_scale: absolute
preserve:
  - concepts: [Claude Monet, a photo of a dog]
solver: {{lambda: 0.3, erase_scale: 0.8, preserve_scale: 0.4}}
""",
    )
    plan = plan_recipe(recipe)
    out = run_apply(plan, out=tmp_path / "out", device="cpu").out
    new, old = kv_weights(out), kv_weights(tiny_sd2_model)
    reference = Reference(tiny_sd2_model)
    pairs = [(p.source, list(p.targets)) for p in plan.pairs]
    worst = max(
        rel(new[key], reference.edit(w, pairs, plan.preserve, 0.3, 0.8, 0.4, mode))
        for key, w in old.items()
    )
    # last-token pads each batch to its longest prompt (exact for a causal encoder in exact
    # arithmetic): in fp32 the last-word vectors then differ from 77-token ones by ~3e-7 relative
    # (measured on this model), which the solve amplifies to ~1.3e-6.
    assert worst < (1e-6 if mode == "paper" else 5e-6), worst
    log = json.loads((out / "edit_log.json").read_text())
    assert log["base_model"]["family"] == "sd2" and log["solver"]["width"] == 48
    assert log["solver"]["groups"]["text"]["width"] == 48


def test_sd2_outputs_load_in_diffusers(edited_sd2: Path, tiny_sd2_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    patched = open_model(str(edited_sd2)).read_kv()
    base = pipeline(tiny_sd2_model)
    assert max(rel(patched[k], v) for k, v in kv_weights(tiny_sd2_model).items()) > 1e-3
    # from_pretrained on the diffusers output: exactly the edited k/v
    folder = pipeline(edited_sd2).unet.state_dict()
    assert all(torch.equal(folder[k], w) for k, w in patched.items())
    # load_lora_weights, both layouts: base + fused LoRA = the edited k/v
    for weight_name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = pipeline(tiny_sd2_model)
        pipe.load_lora_weights(str(edited_sd2), weight_name=weight_name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused = pipe.unet.state_dict()
        assert max(rel(fused[k], w) for k, w in patched.items()) < 1e-5, weight_name
    # from_single_file on the single-file output: edited UNet, the base's VAE and text encoder
    single = StableDiffusionPipeline.from_single_file(
        str(edited_sd2 / "model.safetensors"),
        config=str(tiny_sd2_model),
        local_files_only=True,
        safety_checker=None,
    )
    unet = single.unet.state_dict()
    for key, value in base.unet.state_dict().items():
        assert torch.equal(unet[key], patched.get(key, value)), key
    for name in ("vae", "text_encoder"):
        ours, theirs = getattr(single, name).state_dict(), getattr(base, name).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    with safe_open(str(edited_sd2 / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.") for k in keys)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_sd2_single_file_input_gives_a_patched_copy(
    sd2_single: Path, edited_sd2: Path, tmp_path: Path
) -> None:
    model = open_model(str(sd2_single))
    assert model.family.name == "sd2" and model.single_file == sd2_single
    out = apply_recipe(sd2_single, tmp_path, ["single-file", "delta"])
    with (
        safe_open(str(out / "model.safetensors"), "pt") as a,
        safe_open(str(sd2_single), "pt") as b,
    ):
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]  # noqa: SIM118
    assert len(changed) == 14 and all(".attn2.to_" in k for k in changed)
    reference = open_model(str(edited_sd2)).read_kv()
    got = open_model(str(out / "model.safetensors")).read_kv()
    assert max(rel(got[k], w) for k, w in reference.items()) < 1e-6


def test_sd2_sampling_runs_and_the_edit_changes_pixels(edited_sd2: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["sample", "--steps", "2", "--quiet", "--edit", str(edited_sd2), "--compare",
         "--prompt", "a painting by Kelly Mckernan", "--seed", "3", "--out", str(tmp_path / "s")],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    images = {
        role: np.asarray(Image.open(next((tmp_path / "s" / role).glob("*.png"))), dtype=np.int16)
        for role in ("base", "edited")
    }
    assert images["base"].shape == (64, 64, 3) and images["base"].std() > 0
    assert not np.array_equal(images["base"], images["edited"])


def test_folder_missing_a_component_is_refused(tiny_sd2_model: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(tiny_sd2_model, tmp_path / "broken"))
    shutil.rmtree(broken / "tokenizer")
    recipe = write_recipe(tmp_path, f"model: {broken}\n{ERASE_RECIPE}")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "'tokenizer'" in line and str(broken / "tokenizer") in line and "missing" in line


def test_transfer_between_families_is_refused(
    erased_model: Path, tiny_model: Path, tiny_sd2_model: Path, tmp_path: Path
) -> None:
    sd1_edit = apply_recipe(tiny_model, tmp_path / "sd1", ["operator"])
    result = runner.invoke(
        app,
        ["transfer", str(sd1_edit / "operator.safetensors"), "--model", str(tiny_sd2_model),
         "--out", str(tmp_path / "t")],
    )  # fmt: skip
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "sd1" in line and "Stable Diffusion 2.x" in line and "family" in line
    assert not (tmp_path / "t").exists()
