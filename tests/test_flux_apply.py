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
from uce_cli.plan import plan_recipe
from uce_cli.runner import run_apply

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
