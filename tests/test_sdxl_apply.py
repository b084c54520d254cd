"""SDXL end to end (issue 11): float64 parity in both alignment modes (both groups), every output
loaded by diffusers (from_pretrained, load_lora_weights, from_single_file), single-file input,
sampling, the text-side report, transfer, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.conftest import apply_recipe, write_recipe
from tests.test_solve import rel
from uce_cli.cli import app
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe
from uce_cli.families.model import open_model
from uce_cli.families.sdxl import POOLED_KEY

runner = CliRunner()
ALL_FORMATS = ["diffusers", "delta", "lora", "lora-kohya", "single-file", "operator"]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
POOLED = 40  # the tiny model's pooled width: add_embedding.linear_1's text columns
EDIT = """
erase:
  - concepts: [Kelly Mckernan]
    templates: art
preserve:
  - concepts: [Claude Monet]
layers: {projections: [to_k, to_v, add_embedding]}
"""


def pipeline(folder: Path):  # noqa: ANN201
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(folder))


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / UNET_FILE))


class Reference:
    """Plain float64 UCE on what the SDXL pipeline feeds its UNet (``encode_prompt``), per layer:
    ``text`` rows for attn2 k/v, one pooled vector per prompt for add_embedding's text columns."""

    def __init__(self, model: Path) -> None:
        self.pipe = pipeline(model)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def embed(self, text: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(77, d1+d2) states, (1, d2') pooled vector (float64), and the last word's index f."""
        if text not in self.cache:
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            f = len(self.pipe.tokenizer(text).input_ids) - 2
            self.cache[text] = (hidden[0].double(), pooled.double(), f)
        return self.cache[text]

    def rows(self, text: str, group: str, k: int, start: int | None = None) -> torch.Tensor:
        hidden, pooled, f = self.embed(text)
        first = f if start is None else start
        return hidden[first : first + k] if group == "text" else pooled

    def edit(self, w_old, pairs, preserve, lam, se, sp, mode, group) -> torch.Tensor:  # noqa: ANN001
        w = w_old.double()
        mat1, mat2 = lam * w.clone(), lam * torch.eye(w.shape[1], dtype=torch.float64)
        for source, targets in pairs:
            f = max(self.embed(p)[2] for p in [source, *(t for t, _ in targets)])
            k = 77 - f if mode == "paper" and group == "text" else 1
            c = self.rows(source, group, k)
            c_star = sum(wt * self.rows(t, group, k) for t, wt in targets)
            for c_i, cs_i in zip(c, c_star, strict=True):
                mat1 += se * torch.outer(w @ cs_i, c_i)
                mat2 += se * torch.outer(c_i, c_i)
        for prompt in preserve:
            if group == "pooled" or mode != "paper":
                rows = self.rows(prompt, group, 1)  # the pooled vector / the last word's row
            else:
                rows = self.rows(prompt, group, 77, start=0)
            for c_j in rows:
                mat1 += sp * torch.outer(w @ c_j, c_j)
                mat2 += sp * torch.outer(c_j, c_j)
        return torch.linalg.solve(mat2.T, mat1.T).T  # mat1 · mat2⁻¹


@pytest.fixture(scope="module")
def edited_sdxl(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An erase with the pooled edit on the tiny SDXL, in every format."""
    return apply_recipe(tiny_sdxl, tmp_path_factory.mktemp("sdxl-edit"), ALL_FORMATS, body=EDIT)


def test_sdxl_is_detected_with_its_two_groups(tiny_sdxl: Path) -> None:
    model = open_model(str(tiny_sdxl))
    assert model.family.name == "sdxl"
    assert [(g.name, g.width) for g in model.groups] == [("text", 80), ("pooled", 40)]
    assert len(model.kv) == 35 and model.kv[-1].key == POOLED_KEY
    pooled = model.kv[-1]
    assert (pooled.projection, pooled.columns, pooled.shape) == (
        "add_embedding",
        (0, 40),
        (128, 88),
    )
    assert all(t.columns is None and t.shape[1] == 80 for t in model.kv[:-1])


@pytest.mark.parametrize("mode", ["paper", "last-token"])
def test_sdxl_parity_with_float64_reference(mode: str, tiny_sdxl: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"""
model: {tiny_sdxl}
alignment: {mode}
erase:
  - concepts: [Kelly Mckernan]
    templates: ["painting by {{}}", "{{}}"]
    guide: art
moderate:
  - concepts: [nudity]
preserve:
  - concepts: [Claude Monet, a photo of a dog]
solver: {{lambda: 0.3, erase_scale: 0.8, preserve_scale: 0.4}}
layers: {{projections: [to_k, to_v, add_embedding]}}
""",
    )
    plan = plan_recipe(recipe)
    out = run_apply(plan, out=tmp_path / "out", device="cpu").out
    new, old = unet_weights(out), unet_weights(tiny_sdxl)
    reference = Reference(tiny_sdxl)
    pairs = [(p.source, list(p.targets)) for p in plan.pairs]
    scales = (0.3, 0.8, 0.4, mode)
    text_keys = [k for k in old if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))]
    worst = max(
        rel(new[k], reference.edit(old[k], pairs, plan.preserve, *scales, "text"))
        for k in text_keys
    )
    # last-token pads batches to their longest prompt: exact in exact arithmetic, ~1e-6 in fp32
    assert worst < (1e-6 if mode == "paper" else 5e-6), worst
    w_t = reference.edit(old[POOLED_KEY][:, :POOLED], pairs, plan.preserve, *scales, "pooled")
    assert rel(new[POOLED_KEY][:, :POOLED], w_t) < 1e-6
    assert rel(new[POOLED_KEY][:, :POOLED], old[POOLED_KEY][:, :POOLED]) > 1e-3
    # the time-id columns and the bias are not touched; nothing else changed either
    assert torch.equal(new[POOLED_KEY][:, POOLED:], old[POOLED_KEY][:, POOLED:])
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == {*text_keys, POOLED_KEY}
    log = json.loads((out / "edit_log.json").read_text())
    assert log["base_model"]["family"] == "sdxl"
    assert {g: v["width"] for g, v in log["solver"]["groups"].items()} == {"text": 80, "pooled": 40}


def test_default_projections_leave_the_pooled_path(tiny_sdxl: Path, tmp_path: Path) -> None:
    out = apply_recipe(tiny_sdxl, tmp_path, ["delta"])
    delta = load_file(str(out / "edit.safetensors"))
    assert len(delta) == 34 and f"unet.{POOLED_KEY}" not in delta
    log = json.loads((out / "edit_log.json").read_text())
    assert list(log["solver"]["groups"]) == ["text"]


def test_sdxl_outputs_load_in_diffusers(edited_sdxl: Path, tiny_sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    patched = open_model(str(edited_sdxl)).read_kv()
    base = pipeline(tiny_sdxl)
    assert len(patched) == 35
    folder = pipeline(edited_sdxl).unet.state_dict()
    assert all(torch.equal(folder[k], w) for k, w in patched.items())
    delta = load_file(str(edited_sdxl / "edit.safetensors"))
    assert all(torch.equal(delta[f"unet.{k}"], w) for k, w in patched.items())
    for weight_name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = pipeline(tiny_sdxl)
        pipe.load_lora_weights(str(edited_sdxl), weight_name=weight_name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused = pipe.unet.state_dict()
        assert max(rel(fused[k], w) for k, w in patched.items()) < 1e-5, weight_name
    single = StableDiffusionXLPipeline.from_single_file(
        str(edited_sdxl / "model.safetensors"), config=str(tiny_sdxl), local_files_only=True
    )
    unet = single.unet.state_dict()
    for key, value in base.unet.state_dict().items():
        assert torch.equal(unet[key], patched.get(key, value)), key
    for name in ("vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(single, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in theirs.items() if "position_ids" not in k)
    with safe_open(str(edited_sdxl / "lora_kohya.safetensors"), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
    assert "lora_unet_label_emb_0_0" in names
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names


def test_sdxl_single_file_input_gives_a_patched_copy(
    edited_sdxl: Path, tiny_sdxl: Path, tmp_path: Path
) -> None:
    from uce_cli.families.sdxl_layout import single_file_state

    source = tmp_path / "tiny-sdxl.safetensors"
    save_file(single_file_state(tiny_sdxl, {}), str(source), {"config": str(tiny_sdxl)})
    model = open_model(str(source))
    assert model.family.name == "sdxl" and model.single_file == source
    out = apply_recipe(source, tmp_path, ["single-file"], body=EDIT)
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(source), "pt") as b:
        assert set(a.keys()) == set(b.keys())  # noqa: SIM118
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]  # noqa: SIM118
    assert len(changed) == 35 and "model.diffusion_model.label_emb.0.0.weight" in changed
    reference = open_model(str(edited_sdxl)).read_kv()
    got = open_model(str(out / "model.safetensors")).read_kv()
    assert max(rel(got[k], w) for k, w in reference.items()) < 1e-6


def test_sdxl_sampling_runs_and_the_edit_changes_pixels(edited_sdxl: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["sample", "--steps", "2", "--quiet", "--edit", str(edited_sdxl), "--compare",
         "--prompt", "a painting by Kelly Mckernan", "--seed", "3", "--out", str(tmp_path / "s")],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    images = {
        role: np.asarray(Image.open(next((tmp_path / "s" / role).glob("*.png"))), dtype=np.int16)
        for role in ("base", "edited")
    }
    assert images["base"].shape == (64, 64, 3) and images["base"].std() > 0
    assert not np.array_equal(images["base"], images["edited"])


def test_sdxl_text_report_measures_both_groups(edited_sdxl: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(edited_sdxl, tmp_path / "run"))
    result = runner.invoke(app, ["eval", str(run), "--quiet"])
    assert result.exit_code == 0, result.stderr
    text = json.loads((run / "eval" / "eval.json").read_text())["text"]
    assert len(text["layers"]) == 35
    pooled = text["layers"][POOLED_KEY]
    assert 0 < pooled["efficacy"] <= 1 and pooled["leakage_eos"] is None
    assert 0 < text["figures"]["efficacy"] <= 1


def test_sdxl_operator_transfers_to_a_fine_tune(
    edited_sdxl: Path, tiny_sdxl: Path, tmp_path: Path
) -> None:
    tuned = Path(shutil.copytree(tiny_sdxl, tmp_path / "tuned"))
    weights = unet_weights(tuned)
    gen = torch.Generator().manual_seed(3)
    weights = {k: w + 0.01 * torch.randn(w.shape, generator=gen) for k, w in weights.items()}
    save_file(weights, str(tuned / UNET_FILE))
    result = runner.invoke(
        app,
        ["transfer", str(edited_sdxl), "--model", str(tuned), "--out", str(tmp_path / "t"),
         "--format", "delta", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with safe_open(str(edited_sdxl / "operator.safetensors"), "pt") as f:
        ks = {g: f.get_tensor(f"K.{g}") for g in f.metadata()["groups"].split(",")}
    delta = load_file(str(tmp_path / "t" / "edit.safetensors"))
    for key, w in delta.items():
        w_old = weights[key.removeprefix("unet.")].double()
        if key.endswith(POOLED_KEY):
            assert torch.equal(w[:, POOLED:], w_old[:, POOLED:].float())
            assert rel(w[:, :POOLED], w_old[:, :POOLED] @ ks["pooled"]) < 1e-6
        else:
            assert rel(w, w_old @ ks["text"]) < 1e-6


def test_sd1_operator_is_refused_on_sdxl(tiny_model: Path, tiny_sdxl: Path, tmp_path: Path) -> None:
    sd1_edit = apply_recipe(tiny_model, tmp_path / "sd1", ["operator"])
    result = runner.invoke(
        app, ["transfer", str(sd1_edit), "--model", str(tiny_sdxl), "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "sd1" in line and "Stable Diffusion XL" in line and "family" in line


def test_sdxl_recipe_with_an_over_long_prompt_is_refused(tiny_sdxl: Path, tmp_path: Path) -> None:
    words = " ".join(["cat"] * 80)
    recipe = write_recipe(tmp_path, f"model: {tiny_sdxl}\nerase:\n  - concepts: [{words}]\n")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "erase" in line and "82 tokens" in line and "77" in line and "Traceback" not in line


def test_sdxl_folder_missing_a_component_is_refused(tiny_sdxl: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(tiny_sdxl, tmp_path / "broken"))
    shutil.rmtree(broken / "text_encoder_2")
    recipe = write_recipe(tmp_path, f"model: {broken}\n{EDIT}")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert str(broken / "text_encoder_2") in line and "missing" in line


def test_add_embedding_is_refused_where_the_family_has_none(
    tiny_model: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_model}\n{EDIT}")
    result = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "'add_embedding' is not an editable projection of Stable Diffusion 1.x" in line


@pytest.mark.parametrize("pooled", [True, False])
def test_sdxl_dry_run_counts_the_edited_groups(
    tiny_sdxl: Path, tmp_path: Path, pooled: bool
) -> None:
    body = EDIT if pooled else EDIT.replace(", add_embedding", "")
    recipe = write_recipe(tmp_path, f"model: {tiny_sdxl}\n{body}")
    result = runner.invoke(app, ["apply", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("vectors")]
    if pooled:
        assert lines[0].startswith("vectors (text): ") and "77 per prompt" in lines[0]
        assert lines[1] == "vectors (pooled): 6 edit (1–1 per prompt), 2 preserve (1 per prompt)"
    else:
        assert (
            len(lines) == 1 and lines[0].startswith("vectors: ") and "(77 per prompt)" in lines[0]
        )
