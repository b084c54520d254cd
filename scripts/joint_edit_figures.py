"""Does the closed-form edit of FLUX's text input projections do what it promises, and what does
it do downstream? The figures behind the FLUX/SD3 decision in docs/families.md.

On the tiny seeded FLUX.1- and SD3-shaped pipelines (``uce_cli.weights.tiny_joint``) it runs one erase
(two artists, art templates, guide "art", two preserved artists) and prints:

(a) text side, per edited projection — the figures uce logs per layer (``solve.solve_edit``):
    relative ‖ΔW‖, the residual ‖W C_s − W_old C*‖ / ‖W_old C*‖ before and after, and the
    preserve drift ‖ΔW C_p‖ / ‖W_old C_p‖; and the same two outputs figures for the 2025
    upstream variant, whose targets include the bias (W_old c* + b), measured on the layer's
    outputs (W c + b);
(b) downstream, one transformer forward with fixed latents, timestep and guidance:
    for each stage — the text stream after ``context_embedder``, after each joint block, after
    the single blocks (FLUX), and the image output (the velocity prediction) — the gap between an
    erased prompt and its guide, ‖h(s) − h(g)‖ / ‖h(g)‖ averaged over the edit pairs, before and
    after the edit, and the drift of the preserved prompts ‖h_new(p) − h_old(p)‖ / ‖h_old(p)‖;
    for the edit of the sequence projection alone, the pooled one alone, and both.

The statistics are built here from the family's text path with the alignment of
``uce_cli/families/base.py`` (they do not need the rest of uce). Usage:

    python scripts/joint_edit_figures.py                      # paper alignment
    python scripts/joint_edit_figures.py --alignment last-token --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from uce_cli.edit.plan import plan_recipe
from uce_cli.edit.solve import Scales, solve_edit
from uce_cli.edit.stats import EditStats
from uce_cli.families.base import Tokens
from uce_cli.families.flux import FluxFamily
from uce_cli.families.joint import CONTEXT_KEY, POOLED_KEY
from uce_cli.families.sd3 import SD3Family
from uce_cli.weights.tiny_joint import write_tiny_joint

RECIPE = """model: {model}
alignment: {alignment}
erase:
  - concepts: [Kelly Mckernan, Thomas Kinkade]
    guide: art
    templates: art
preserve:
  - concepts: [Claude Monet, Rembrandt]
"""


def spans(source: Tokens, target: Tokens, alignment: str) -> tuple[int, int, int]:
    """(source start, target start, length) of one pair under base.py's alignment modes."""
    if alignment == "last-token":
        return source.last_word, target.last_word, 1
    k = min(source.seen - source.last_word, target.seen - target.last_word)
    return source.last_word, target.last_word, k


def group_statistics(
    plan: object, vectors: dict[str, torch.Tensor], tokens: dict[str, Tokens]
) -> EditStats:
    """Float64 Gram statistics of one group from its vectors ((L, d) per prompt)."""
    width = next(iter(vectors.values())).shape[-1]
    stats = EditStats.zeros(width, torch.device("cpu"))
    for pair in plan.pairs:
        ((guide, weight),) = pair.targets
        s0, t0, k = spans(tokens[pair.source], tokens[guide], plan.alignment)
        c_s = vectors[pair.source][s0 : s0 + k].double()
        c_t = weight * vectors[guide][t0 : t0 + k].double()
        stats.G_s += c_s.T @ c_s
        stats.G_ts += c_t.T @ c_s
        stats.G_t += c_t.T @ c_t
        stats.n_edit_vectors += k
    for prompt in plan.preserve:
        t = tokens[prompt]
        rows = (
            vectors[prompt][: t.seen]
            if plan.alignment == "paper"
            else vectors[prompt][t.last_word : t.last_word + 1]
        )
        stats.G_p += rows.double().T @ rows.double()
        stats.n_preserve_vectors += rows.shape[0]
    return stats


def upstream_output_figures(
    w: torch.Tensor,
    b: torch.Tensor,
    plan: object,
    vectors: dict[str, torch.Tensor],
    tokens: dict[str, Tokens],
    scales: Scales,
) -> dict[str, float]:
    """The 2025 upstream variant (targets W c* + b), and ours, measured on outputs W c + b."""
    w = w.double()
    b = b.double()
    d = w.shape[1]
    pairs = []
    for pair in plan.pairs:
        ((guide, _),) = pair.targets
        s0, t0, k = spans(tokens[pair.source], tokens[guide], plan.alignment)
        pairs.append(
            (vectors[pair.source][s0 : s0 + k].double(), vectors[guide][t0 : t0 + k].double())
        )
    keep = []
    for prompt in plan.preserve:
        t = tokens[prompt]
        rows = (
            vectors[prompt][: t.seen]
            if plan.alignment == "paper"
            else vectors[prompt][t.last_word : t.last_word + 1]
        )
        keep.append(rows.double())
    c_s = torch.cat([p[0] for p in pairs])  # (N, d)
    c_t = torch.cat([p[1] for p in pairs])
    c_p = torch.cat(keep)
    m = scales.lam * torch.eye(d, dtype=torch.float64)
    m += scales.erase_scale * c_s.T @ c_s + scales.preserve_scale * c_p.T @ c_p
    out: dict[str, float] = {}
    for name, bias_in_targets in (("ours", False), ("upstream", True)):
        shift = b if bias_in_targets else torch.zeros_like(b)
        v_t = c_t @ w.T + shift  # (N, d_out) targets
        v_p = c_p @ w.T + shift
        numer = (
            scales.lam * w + scales.erase_scale * v_t.T @ c_s + scales.preserve_scale * v_p.T @ c_p
        )
        w_new = torch.linalg.solve(m, numer.T).T  # numer · M⁻¹ (M symmetric)
        want_t = c_t @ w.T + b  # what the guide's outputs are
        old_p = c_p @ w.T + b
        out[f"{name}_output_residual"] = float((c_s @ w_new.T + b - want_t).norm() / want_t.norm())
        out[f"{name}_output_preserve_drift"] = float(
            (c_p @ w_new.T + b - old_p).norm() / old_p.norm()
        )
    out["output_residual_before"] = float(
        (c_s @ w.T + b - (c_t @ w.T + b)).norm() / (c_t @ w.T + b).norm()
    )
    return out


def text_side(family_cls: type, root: Path, alignment: str, work: Path) -> tuple[dict, dict, dict]:
    """(figures per key, new weights per key, the plan's prompts' vectors) for one tiny model."""
    from safetensors.torch import load_file

    family = family_cls(root, json.loads((root / "model_index.json").read_text()))
    recipe = work / f"{family.name}-{alignment}.yaml"
    recipe.write_text(RECIPE.format(model=root, alignment=alignment))
    plan = plan_recipe(recipe)
    path = family.text_path(torch.device("cpu"), torch.float32)
    prompts = plan.prompts()
    tokens = path.tokens(prompts)
    encoded = path.encode(prompts)
    weights = load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    scales = Scales(plan.lam, plan.erase_scale, plan.preserve_scale)
    figures: dict[str, dict] = {}
    new: dict[str, torch.Tensor] = {}
    for group in path.groups:
        vectors = {p: encoded[group.name][i] for i, p in enumerate(prompts)}
        stats = group_statistics(plan, vectors, tokens[group.name])
        keys = [k for k in (CONTEXT_KEY, POOLED_KEY) if family.group_of(k)[0] == group.name]
        edited, _, metrics = solve_edit({k: weights[k] for k in keys}, stats, scales)
        new.update(edited)
        for key in keys:
            bias = weights[key.removesuffix(".weight") + ".bias"]
            figures[key] = {
                "group": group.name,
                "edit_vectors": stats.n_edit_vectors,
                "preserve_vectors": stats.n_preserve_vectors,
                **metrics[key],
                **upstream_output_figures(
                    weights[key], bias, plan, vectors, tokens[group.name], scales
                ),
            }
    return figures, new, {"plan": plan, "encoded": encoded, "prompts": prompts, "tokens": tokens}


@torch.no_grad()
def flux_downstream(root: Path, new: dict[str, torch.Tensor], data: dict) -> dict[str, dict]:
    """Erased-vs-guide gaps and preserve drifts per stage of one FLUX forward pass."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(root / "transformer").eval()
    old = {k: transformer.state_dict()[k].clone() for k in new}
    plan, encoded, prompts = data["plan"], data["encoded"], data["prompts"]
    index = {p: i for i, p in enumerate(prompts)}
    n = len(prompts)
    side = 8  # an 8×8 token latent (a 32 px image at the tiny VAE's scale)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, side * side, transformer.config.in_channels, generator=gen)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(encoded["t5"].shape[1], 3)
    stages: dict[str, list[torch.Tensor]] = {}

    def hook(name: str, pick: int | None) -> object:
        def grab(_module: object, _inputs: object, output: object) -> None:
            stages.setdefault(name, []).append((output if pick is None else output[pick]).clone())

        return grab

    transformer.context_embedder.register_forward_hook(hook("text: context_embedder", None))
    for i, block in enumerate(transformer.transformer_blocks):
        block.register_forward_hook(hook(f"text: after joint block {i}", 0))
    last = transformer.single_transformer_blocks[-1]
    last.register_forward_hook(hook("text: after single blocks", 0))

    # The sequence path alone: every prompt gets the same pooled vector (the first prompt's), so
    # the image output differs between prompts only through context_embedder's input.
    fixed_pooled = encoded["pooled"][:1, 0].expand(n, -1)

    def forward(pooled: torch.Tensor) -> torch.Tensor:
        return transformer(
            hidden_states=latents.expand(n, -1, -1),
            encoder_hidden_states=encoded["t5"],
            pooled_projections=pooled,
            timestep=torch.full((n,), 0.5),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=torch.full((n,), 3.5),
            return_dict=False,
        )[0]

    def run() -> dict[str, torch.Tensor]:
        stages.clear()
        output = forward(encoded["pooled"][:, 0])
        text = {k: v[0] for k, v in stages.items()}
        only_sequence = forward(fixed_pooled)
        return {
            **text,
            "image output (velocity)": output,
            "image output, sequence path only": only_sequence,
        }

    return _compare(run, transformer, new, old, plan, index, data["tokens"]["t5"])


@torch.no_grad()
def sd3_downstream(root: Path, new: dict[str, torch.Tensor], data: dict) -> dict[str, dict]:
    """The same stages through one SD3 forward (its last joint block reads text, writes none)."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(root / "transformer").eval()
    old = {k: transformer.state_dict()[k].clone() for k in new}
    plan, encoded, prompts = data["plan"], data["encoded"], data["prompts"]
    index = {p: i for i, p in enumerate(prompts)}
    n = len(prompts)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, transformer.config.in_channels, 16, 16, generator=gen)
    stages: dict[str, torch.Tensor] = {}

    def grab(name: str, pick: int | None) -> object:
        def hook(_module: object, _inputs: object, output: object) -> None:
            stages[name] = (output if pick is None else output[pick]).clone()

        return hook

    transformer.context_embedder.register_forward_hook(grab("text: context_embedder", None))
    for i, block in enumerate(transformer.transformer_blocks[:-1]):
        block.register_forward_hook(grab(f"text: after joint block {i}", 0))
    fixed_pooled = encoded["pooled"][:1, 0].expand(n, -1)

    def forward(pooled: torch.Tensor) -> torch.Tensor:
        return transformer(
            hidden_states=latents.expand(n, -1, -1, -1),
            encoder_hidden_states=encoded["joint"],
            pooled_projections=pooled,
            timestep=torch.full((n,), 500.0),
            return_dict=False,
        )[0]

    def run() -> dict[str, torch.Tensor]:
        stages.clear()
        output = forward(encoded["pooled"][:, 0])
        text = dict(stages)
        return {
            **text,
            "image output (velocity)": output,
            "image output, sequence path only": forward(fixed_pooled),
        }

    return _compare(run, transformer, new, old, plan, index, data["tokens"]["joint"])


def _aligned(
    t: torch.Tensor, plan: object, index: dict[str, int], tokens: dict[str, Tokens]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(erased, guide) rows of each pair: whole outputs, or the aligned span of a sequence."""
    out = []
    for pair in plan.pairs:
        s, g = t[index[pair.source]], t[index[pair.targets[0][0]]]
        if s.dim() == 2 and s.shape[0] == tokens[pair.source].seen:
            s0, g0, k = spans(tokens[pair.source], tokens[pair.targets[0][0]], plan.alignment)
            s, g = s[s0 : s0 + k], g[g0 : g0 + k]
        out.append((s, g))
    return out


def _compare(
    run: object,
    model: torch.nn.Module,
    new: dict[str, torch.Tensor],
    old: dict[str, torch.Tensor],
    plan: object,
    index: dict[str, int],
    tokens: dict[str, Tokens],
    variants: tuple[tuple[str, list[str]], ...] | None = None,
) -> dict[str, dict]:
    """Gaps erased → guide (whole, and on the aligned positions) and preserve drifts, per stage."""

    def gap(h: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {}
        for name, t in h.items():
            whole = [
                float(
                    (t[index[p.source]] - t[index[p.targets[0][0]]]).norm()
                    / t[index[p.targets[0][0]]].norm()
                )
                for p in plan.pairs
            ]
            out[name] = sum(whole) / len(whole)
            if name.startswith("text"):  # a text sequence: also the positions the edit pairs
                rows = _aligned(t, plan, index, tokens)
                vals = [float((s - g).norm() / g.norm()) for s, g in rows]
                out[name + " [aligned]"] = sum(vals) / len(vals)
        return out

    before = run()
    results: dict[str, dict] = {"none": {"gap": gap(before)}}
    variants = variants or (
        ("context_embedder only", [CONTEXT_KEY]),
        ("pooled projection only", [POOLED_KEY]),
        ("both", [CONTEXT_KEY, POOLED_KEY]),
    )
    for label, keys in variants:
        sd = model.state_dict()
        for key in new:
            sd[key].copy_(new[key] if key in keys else old[key])
        after = run()
        drift = {}
        for name, t in after.items():
            vals = [
                float((t[index[p]] - before[name][index[p]]).norm() / before[name][index[p]].norm())
                for p in plan.preserve
            ]
            drift[name] = sum(vals) / len(vals)
        results[label] = {"gap": gap(after), "preserve_drift": drift}
    return results


@torch.no_grad()
def sd_downstream(work: Path, alignment: str) -> dict[str, dict]:
    """The same comparison on the tiny SD 1.x model edited on its k/v (the reference behaviour)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from uce_cli.weights.tiny import write_tiny_model

    root = write_tiny_model(work / "sd1")
    recipe = work / f"sd1-{alignment}.yaml"
    recipe.write_text(RECIPE.format(model=root, alignment=alignment))
    plan = plan_recipe(recipe)
    prompts = plan.prompts()
    index = {p: i for i, p in enumerate(prompts)}
    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    enc = CLIPTextModel.from_pretrained(str(root / "text_encoder")).eval()
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    hidden = enc(ids.input_ids)[0]
    tokens = {
        p: Tokens(int(n), int(n) - 2, 77)
        for p, n in zip(prompts, ids.attention_mask.sum(1), strict=True)
    }
    stats = group_statistics(plan, {p: hidden[i] for p, i in index.items()}, tokens)
    weights = load_file(str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    kv = {k: w for k, w in weights.items() if ".attn2.to_k." in k or ".attn2.to_v." in k}
    scales = Scales(plan.lam, plan.erase_scale, plan.preserve_scale)
    new, _, _ = solve_edit(kv, stats, scales)
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    old = {k: unet.state_dict()[k].clone() for k in new}
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen).expand(len(prompts), -1, -1, -1)

    def run() -> dict[str, torch.Tensor]:
        out = unet(latents, torch.full((len(prompts),), 500), encoder_hidden_states=hidden).sample
        return {"image output (noise)": out}

    return _compare(run, unet, new, old, plan, index, tokens, (("attn2 k/v (uce)", list(new)),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alignment", choices=["paper", "last-token"], default="paper")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind, cls in (("flux", FluxFamily), ("sd3", SD3Family)):
            root = write_tiny_joint(kind, work / kind)
            figures, new, data = text_side(cls, root, args.alignment, work)
            report[kind] = {"text_side": figures}
            downstream = flux_downstream if kind == "flux" else sd3_downstream
            report[kind]["downstream"] = downstream(root, new, data)
        report["sd1"] = {"text_side": {}, "downstream": sd_downstream(work, args.alignment)}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for kind, rep in report.items():
        print(f"== {kind} ({args.alignment}) text side")
        for key, f in rep["text_side"].items():
            print(
                f"  {key} [{f['group']}] edit/preserve vectors {f['edit_vectors']}/{f['preserve_vectors']}: "
                f"rel_dW {f['rel_delta']:.3g}, residual {f['residual_before']:.3g} -> "
                f"{f['residual_after']:.3g}, preserve drift {f['preserve_drift']:.3g}"
            )
            print(
                f"    outputs W c + b: residual {f['output_residual_before']:.3g} -> ours "
                f"{f['ours_output_residual']:.3g} / upstream {f['upstream_output_residual']:.3g}; "
                f"preserve drift ours {f['ours_output_preserve_drift']:.3g} / upstream "
                f"{f['upstream_output_preserve_drift']:.3g}"
            )
        if "downstream" in rep:
            down = rep["downstream"]
            print(f"== {kind} downstream: gap erased->guide before | after (preserve drift)")
            for stage, before in down["none"]["gap"].items():
                cells = [f"{before:.3g}"]
                for label, d in down.items():
                    if label != "none":
                        drift = d["preserve_drift"].get(stage)
                        shown = f" ({drift:.3g})" if drift is not None else ""
                        cells.append(f"{label}: {d['gap'][stage]:.3g}{shown}")
                print(f"  {stage:40s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
