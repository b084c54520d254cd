"""``uce apply`` on FLUX.1 and SD3: float64 parity of both groups' edits with a plain reference, both
alignment modes; the bias untouched; every output format loaded back by diffusers.

The reference is written out here from docs/design.md and docs/families.md, independently of uce:
it encodes with the pipeline's own ``encode_prompt``, one pair at a time, sums rank-1 terms and
solves ``mat1 · mat2⁻¹`` in float64, for ``context_embedder`` and the pooled ``linear_1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_recipe
from uce_cli.commands.apply import run_apply
from uce_cli.edit.plan import plan_recipe

TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"
CONTEXT = "context_embedder.weight"
POOLED = "time_text_embed.text_embedder.linear_1.weight"

RECIPE = """
model: {model}
alignment: {mode}
erase:
  - concepts: [Kelly Mckernan, Kinkade]
    templates: ["painting by {{}}", "{{}}"]
    guide: art
moderate:
  - concepts: [nudity]
preserve:
  - concepts: [Claude Monet, a photo of a dog]
solver: {{lambda: 0.3, erase_scale: 0.8, preserve_scale: 0.4}}
"""


class JointReference:
    """Plain float64 UCE on a joint-attention pipeline's two text input projections."""

    def __init__(self, kind: str, root: Path) -> None:
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        cls = FluxPipeline if kind == "flux" else StableDiffusion3Pipeline
        self.kind = kind
        self.pipe = cls.from_pretrained(root, transformer=None, vae=None)
        # FLUX: T5 from its last word piece (before </s>); SD3: the CLIP part from CLIP's last word.
        self.seen = 512 if kind == "flux" else 77 + 256
        self.tokenizer = self.pipe.tokenizer_2 if kind == "flux" else self.pipe.tokenizer

    @torch.no_grad()
    def embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """((seen, d) sequence, (1, d) pooled, last word index) of one prompt, float64."""
        if self.kind == "flux":
            seq, pooled, _ = self.pipe.encode_prompt(prompt, None, max_sequence_length=512)
        else:
            seq, _, pooled, _ = self.pipe.encode_prompt(
                prompt, None, None, do_classifier_free_guidance=False
            )
        n = len(self.tokenizer(prompt).input_ids)
        return seq[0].double(), pooled.double(), max(n - 2, 0)

    def rows(self, prompt: str, group: str, start: int | None, k: int) -> torch.Tensor:
        seq, pooled, f = self.embed(prompt)
        if group == "pooled":
            return pooled
        s = f if start is None else start
        return seq[s : s + k]

    def edit(self, w_old: torch.Tensor, group: str, plan: object, mode: str) -> torch.Tensor:
        w = w_old.double()
        d = w.shape[1]
        lam, se, sp = plan.lam, plan.erase_scale, plan.preserve_scale
        mat1, mat2 = lam * w.clone(), lam * torch.eye(d, dtype=torch.float64)
        for pair in plan.pairs:
            ((guide, weight),) = pair.targets
            f_s, f_t = self.embed(pair.source)[2], self.embed(guide)[2]
            k = self.seen - max(f_s, f_t) if mode == "paper" else 1
            c = self.rows(pair.source, group, None, k)
            c_star = weight * self.rows(guide, group, None, k)
            for c_i, cs_i in zip(c, c_star, strict=True):
                mat1 += se * torch.outer(w @ cs_i, c_i)
                mat2 += se * torch.outer(c_i, c_i)
        for prompt in plan.preserve:
            seq, pooled, f = self.embed(prompt)
            rows = pooled if group == "pooled" else (seq if mode == "paper" else seq[f : f + 1])
            for c_j in rows:
                mat1 += sp * torch.outer(w @ c_j, c_j)
                mat2 += sp * torch.outer(c_j, c_j)
        return torch.linalg.solve(mat2.T, mat1.T).T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("mode", ["paper", "last-token"])
def test_parity_with_float64_reference(
    kind: str, mode: str, tiny_flux: Path, tiny_sd3: Path, tmp_path: Path
) -> None:
    base = tiny_flux if kind == "flux" else tiny_sd3
    plan = plan_recipe(write_recipe(tmp_path, RECIPE.format(model=base, mode=mode)))
    out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=False).out
    old, new = load_file(str(base / TRANSFORMER_FILE)), load_file(str(out / TRANSFORMER_FILE))
    ref = JointReference(kind, base)
    group = {"flux": "t5", "sd3": "joint"}[kind]
    for key, g in ((CONTEXT, group), (POOLED, "pooled")):
        expected = ref.edit(old[key], g, plan, mode)
        assert rel(new[key], expected) < 1e-6, (key, rel(new[key], expected))
        assert rel(new[key], old[key]) > 1e-3  # the edit did something
    # only the two weights changed: both biases and every other tensor are the base's
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed == {CONTEXT, POOLED}


ERASE = """
erase:
  - concepts: [Kelly Mckernan]
    templates: art
    guide: art
preserve:
  - concepts: [Claude Monet]
"""


def cli(*args: object) -> object:
    from typer.testing import CliRunner

    from uce_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_error(result: object, *needles: str, code: int = 1) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture(scope="module")
def flux_edit(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX erase written as diffusers folder, delta, LoRA and operator, through the CLI."""
    folder = tmp_path_factory.mktemp("flux-edit")
    recipe = write_recipe(
        folder,
        f"model: {tiny_flux}\n{ERASE}output: {{formats: [diffusers, delta, lora, operator]}}\n",
    )
    result = cli("apply", recipe, "--out", folder / "out", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    return folder / "out"


def test_flux_outputs_load_back(tiny_flux: Path, flux_edit: Path) -> None:
    from diffusers import FluxPipeline

    from uce_cli.edit.solve import apply_operator

    old = load_file(str(tiny_flux / TRANSFORMER_FILE))
    new = load_file(str(flux_edit / TRANSFORMER_FILE))
    edited = {CONTEXT: new[CONTEXT], POOLED: new[POOLED]}
    assert all(rel(edited[k], old[k]) > 1e-3 for k in edited)
    # the diffusers folder loads as a FluxPipeline with the edited weights
    pipe = FluxPipeline.from_pretrained(flux_edit)
    state = pipe.transformer.state_dict()
    assert all(torch.equal(state[k], w) for k, w in edited.items())
    # delta: exactly the two edited tensors
    delta = load_file(str(flux_edit / "edit.safetensors"))
    assert set(delta) == {f"transformer.{k}" for k in edited}
    assert all(torch.equal(delta[f"transformer.{k}"], w) for k, w in edited.items())
    # LoRA (diffusers layout): FluxPipeline.load_lora_weights on the base gives the edited weights
    base = FluxPipeline.from_pretrained(tiny_flux)
    base.load_lora_weights(flux_edit)
    base.fuse_lora()
    base.unload_lora_weights()
    state = base.transformer.state_dict()
    assert max(rel(state[k], w) for k, w in edited.items()) < 1e-6
    # operator: one K per group, W_old·K gives the edited weights
    ops = load_file(str(flux_edit / "operator.safetensors"))
    assert {k: tuple(v.shape) for k, v in ops.items()} == {
        "K.t5": (48, 48),
        "K.pooled": (32, 32),
    }
    assert rel(apply_operator(old[CONTEXT], ops["K.t5"]), edited[CONTEXT]) < 1e-6
    assert rel(apply_operator(old[POOLED], ops["K.pooled"]), edited[POOLED]) < 1e-6
    # the edit log names the family and what it edits, per group
    log = __import__("json").loads((flux_edit / "edit_log.json").read_text())
    assert log["base_model"]["family"] == "flux"
    assert set(log["solver"]["groups"]) == {"t5", "pooled"}
    assert set(log["layers"]) == {f"transformer.{k}" for k in edited}
    assert log["plan"]["projections"] == ["context_embedder", "text_embedder"]
    for figures in log["layers"].values():
        assert figures["residual_after"] < 0.2 * figures["residual_before"]


def test_flux_refusals(tiny_flux: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_flux}\n{ERASE}")
    for fmt in ("lora-kohya", "single-file"):
        result = cli("apply", recipe, "--out", tmp_path / fmt, "--format", fmt, "--device", "cpu")
        assert_error(result, f"the {fmt} format has no layout for FLUX.1")
        assert not (tmp_path / fmt).exists()
    # a projection FLUX does not edit is refused, never replaced by another one
    wrong = write_recipe(
        tmp_path, f"model: {tiny_flux}\n{ERASE}layers: {{projections: [to_k]}}\n", "wrong.yaml"
    )
    result = cli("apply", wrong, "--out", tmp_path / "wrong", "--device", "cpu")
    assert_error(result, "layers.projections: 'to_k' is not an editable projection of FLUX.1")
    assert "context_embedder, text_embedder" in result.stderr


def test_flux_one_projection(tiny_flux: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, f"model: {tiny_flux}\n{ERASE}layers: {{projections: [context_embedder]}}\n"
    )
    plan = plan_recipe(recipe)
    out = run_apply(plan, out=tmp_path / "out", device="cpu", use_cache=False).out
    old, new = load_file(str(tiny_flux / TRANSFORMER_FILE)), load_file(str(out / TRANSFORMER_FILE))
    assert {k for k in old if not torch.equal(old[k], new[k])} == {CONTEXT}


def test_flux_sample_compare(tiny_flux: Path, flux_edit: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    out = tmp_path / "samples"
    result = cli(
        "sample", "--model", tiny_flux, "--edit", flux_edit, "--compare", "--steps", "2",
        "--height", "32", "--width", "32", "--prompt", "painting by Kelly Mckernan",
        "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    pngs = sorted(p for p in out.rglob("*.png") if "grids" not in p.parts)
    assert len(pngs) == 2
    base, edited = (np.asarray(Image.open(p), dtype=np.float64) for p in pngs)
    assert base.shape == (32, 32, 3) and np.abs(base - edited).max() > 0  # the edit shows
    refused = cli(
        "sample", "--model", tiny_flux, "--prompt", "a cat", "--negative-prompt", "dog",
        "--out", tmp_path / "neg",
    )  # fmt: skip
    assert_error(refused, "--negative-prompt: FLUX.1 pipelines take no negative prompt")


def test_flux_eval_text_report(flux_edit: Path) -> None:
    import math

    result = cli("eval", flux_edit, "--json", "--device", "cpu", "--no-plots")
    assert result.exit_code == 0, result.stderr
    report = __import__("json").loads(result.stdout)
    figures = report.get("figures", report)
    values = {k: figures[k] for k in ("efficacy", "drift_preserve") if k in figures}
    assert values and all(math.isfinite(v) for v in values.values())
    assert values["efficacy"] > 0


def test_flux_transfer(tiny_flux: Path, flux_edit: Path, tmp_path: Path, tiny_model: Path) -> None:
    import shutil

    from uce_cli.edit.solve import apply_operator
    from uce_cli.weights.tiny_joint import write_tiny_joint

    other = write_tiny_joint("flux", tmp_path / "other", seed=1)
    for name in ("text_encoder", "text_encoder_2"):  # same text encoders, another transformer
        shutil.rmtree(other / name)
        shutil.copytree(tiny_flux / name, other / name)
    result = cli(
        "transfer", flux_edit, "--model", other, "--out", tmp_path / "t", "--format", "delta"
    )
    assert result.exit_code == 0, result.stderr
    ops = load_file(str(flux_edit / "operator.safetensors"))
    base = load_file(str(other / TRANSFORMER_FILE))
    delta = load_file(str(tmp_path / "t" / "edit.safetensors"))
    assert rel(delta[f"transformer.{CONTEXT}"], apply_operator(base[CONTEXT], ops["K.t5"])) < 1e-6
    assert rel(delta[f"transformer.{POOLED}"], apply_operator(base[POOLED], ops["K.pooled"])) < 1e-6
    mixed = cli("transfer", flux_edit, "--model", tiny_model, "--out", tmp_path / "m")
    assert_error(
        mixed, "made for a flux model", "an operator only transfers within one model family"
    )


def test_sd3_outputs_and_sample(tiny_sd3: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    recipe = write_recipe(
        tmp_path, f"model: {tiny_sd3}\n{ERASE}output: {{formats: [diffusers, lora, operator]}}\n"
    )
    result = cli("apply", recipe, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    new = load_file(str(out / TRANSFORMER_FILE))
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    base.load_lora_weights(out)
    base.fuse_lora()
    base.unload_lora_weights()
    state = base.transformer.state_dict()
    assert max(rel(state[k], new[k]) for k in (CONTEXT, POOLED)) < 1e-6
    assert set(load_file(str(out / "operator.safetensors"))) == {"K.joint", "K.pooled"}
    result = cli(
        "sample", "--edit", out, "--steps", "2", "--height", "32", "--width", "32",
        "--prompt", "painting by Kelly Mckernan", "--out", tmp_path / "s", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "s").rglob("*.png"))) == 1


def test_flux_dry_run(tiny_flux: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_flux}\n{ERASE}")
    result = cli("apply", recipe, "--dry-run")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "projections all: text input projections (context_embedder" in text
    # 6 erase prompts: one pooled vector each; paper mode on T5: 512 − f per prompt
    assert "vectors (pooled): 6 edit (1–1 per prompt), 2 preserve (1 per prompt)" in text
    assert "vectors (t5):" in text and "preserve (512 per prompt)" in text
    assert not (tmp_path / "out").exists()


def test_flux_merge_lora(tiny_flux: Path, flux_edit: Path, tmp_path: Path) -> None:
    lora = flux_edit / "pytorch_lora_weights.safetensors"
    result = cli("merge", tiny_flux, lora, "--out", tmp_path / "m", "--format", "delta")
    assert result.exit_code == 0, result.stderr
    merged = load_file(str(tmp_path / "m" / "edit.safetensors"))
    delta = load_file(str(flux_edit / "edit.safetensors"))
    assert set(merged) == set(delta)
    assert max(rel(merged[k], delta[k]) for k in delta) < 1e-6


def test_sd_refuses_joint_projection(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, f"model: {tiny_model}\n{ERASE}layers: {{projections: [context_embedder]}}\n"
    )
    result = cli("apply", recipe, "--out", tmp_path / "out", "--device", "cpu")
    assert_error(result, "'context_embedder' is not an editable projection of Stable Diffusion 1.x")
    assert "to_k, to_v" in result.stderr and not (tmp_path / "out").exists()
