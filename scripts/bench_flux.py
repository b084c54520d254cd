"""Measure ``uce apply`` on a FLUX.1-architecture text path with random weights: tensors and
parameters edited, operator size per group, and the time of each stage.

What is full size and what is not (T5-XXL's 4.7 B parameters are 19 GB in fp32, more than this
machine holds beside everything else):

- the two edited projections at FLUX.1's shapes: ``context_embedder`` 3072 × 4096 and the pooled
  ``time_text_embed.text_embedder.linear_1`` 3072 × 768, inside a ``FluxTransformer2DModel`` with
  FLUX.1-dev's config but ``--blocks`` joint and single blocks (default 0: uce never reads them);
- CLIP-L: the real ViT-L/14 text config (123 M parameters);
- T5: T5-XXL's widths (d_model 4096, d_ff 10240, 64 heads, vocabulary 32128) with ``--t5-layers``
  of its 24 layers (default 2); the encode stage is reported as measured and scaled to 24 layers;
- tokenizers: uce's generated CLIP BPE and T5 Unigram (positions as the real ones for template
  words; vocabularies far smaller).

``--family sd3`` measures Stable Diffusion 3 (medium) the same way: ``context_embedder`` 1536 ×
4096 and the pooled ``time_text_embed.text_embedder.linear_1`` 1536 × 2048 inside an
``SD3Transformer2DModel`` with SD3-medium's config but ``--blocks`` joint blocks (default 0); CLIP-L
and OpenCLIP bigG (CLIP-G: width 1280, 32 layers, 20 heads) at their real configs as
``CLIPTextModelWithProjection``; T5 at XXL widths with ``--t5-layers`` layers, at the pipeline's
256 tokens (FLUX: 512).

Usage:
    python scripts/bench_flux.py                       # CPU, 2 T5 layers
    python scripts/bench_flux.py --family sd3          # SD3-medium's text path, 2 T5 layers
    python scripts/bench_flux.py --device cuda --t5-layers 24 --dtype bf16 --save-dtype bf16
        # full T5-XXL (4.7 B, 9.5 GB in bf16) on a large GPU: ~15 GB disk, ~25 GB RAM to build
    python scripts/bench_flux.py --work /data/flux-bench   # keep (and reuse) the model folder
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from uce_cli.weights.full_size import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT

RECIPE = """model: {model}
alignment: {alignment}
erase:
  - concepts: {concepts}
    guide: art
    templates: art
preserve:
  - concepts: {preserve}
output: {{formats: [{formats}]}}
"""


# SD3-medium's transformer config (stabilityai/stable-diffusion-3-medium-diffusers), less the blocks
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
# family: (the T5 tokenizer's folder, its text encoder's folder, tokens T5 reads)
T5_PATH = {
    "flux": ("tokenizer_2", "text_encoder_2", 512),
    "sd3": ("tokenizer_3", "text_encoder_3", 256),
}


def _clip(model_class: type, config: dict, tokenizer: object) -> torch.nn.Module:
    from transformers import CLIPTextConfig

    return model_class(
        CLIPTextConfig(
            **config,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _t5_xxl(t5_tok: object, t5_layers: int) -> torch.nn.Module:
    """T5-v1.1-XXL's encoder at its widths, with ``t5_layers`` of its 24 layers."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=t5_layers,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            is_gated_act=True,
            dense_act_fn="gelu_new",
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )


def build_model(dest: Path, t5_layers: int, blocks: int, save_dtype: torch.dtype) -> Path:
    """Write the random FLUX.1-architecture folder (seeded) at ``dest``, weights in ``save_dtype``
    (FLUX.1-dev ships bf16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from uce_cli.weights.tiny import build_tiny_tokenizer
    from uce_cli.weights.tiny_joint import _vae, build_tiny_t5_tokenizer

    clip_tok, t5_tok = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    clip = _clip(CLIPTextModel, CLIP_L_TEXT, clip_tok)
    t5 = _t5_xxl(t5_tok, t5_layers)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=blocks,
        num_single_layers=blocks,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    for module in (clip, t5, transformer):
        module.to(save_dtype)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_vae(0),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    return _save(pipe, dest)


def build_sd3(dest: Path, t5_layers: int, blocks: int, save_dtype: torch.dtype) -> Path:
    """Write the random SD3-medium text path (seeded) at ``dest``: CLIP-L and CLIP-G with their
    projections, T5 at XXL widths, the transformer with ``blocks`` joint blocks; as in
    ``uce_cli.weights.tiny_joint.build_tiny_sd3`` (CLIP-G's tokenizer pads with "!")."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from uce_cli.weights.tiny import build_tiny_tokenizer
    from uce_cli.weights.tiny_joint import _vae, build_tiny_t5_tokenizer

    clip_tok, clip_g_tok, t5_tok = (
        build_tiny_tokenizer(),
        build_tiny_tokenizer(),
        build_tiny_t5_tokenizer(),
    )
    clip_g_tok.pad_token = "!"
    torch.manual_seed(0)
    clip = _clip(CLIPTextModelWithProjection, CLIP_L_TEXT, clip_tok)
    clip_g = _clip(CLIPTextModelWithProjection, OPENCLIP_BIGG_TEXT, clip_g_tok)
    t5 = _t5_xxl(t5_tok, t5_layers)
    transformer = SD3Transformer2DModel(**SD3_MEDIUM, num_layers=blocks)
    for module in (clip, clip_g, t5, transformer):
        module.to(save_dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(0),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_g_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    return _save(pipe, dest)


def _save(pipe: object, dest: Path) -> Path:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(dest)
    return dest


def time_t5(
    model: Path, prompts: list[str], device: str, dtype: str, family: str = "flux"
) -> float:
    """Seconds of T5 forwards over ``prompts`` at the family's length (FLUX 512 tokens, SD3 256),
    32 a batch (uce's default)."""
    from transformers import AutoTokenizer, T5EncoderModel

    from uce_cli.families.model import DTYPES, pick_device, pick_dtype

    run_device = pick_device(device)
    run_dtype = pick_dtype(dtype, run_device) if dtype == "auto" else DTYPES[dtype]
    tokenizer_folder, encoder_folder, length = T5_PATH[family]
    tok = AutoTokenizer.from_pretrained(str(model / tokenizer_folder))
    t5 = T5EncoderModel.from_pretrained(str(model / encoder_folder), dtype=run_dtype)
    t5 = t5.to(run_device).eval()
    with torch.inference_mode():
        ids = tok(prompts, padding="max_length", max_length=length, return_tensors="pt").input_ids
        t5(ids[:1].to(run_device))  # warm-up
        if run_device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(prompts), 32):
            t5(ids[i : i + 32].to(run_device))
        if run_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--family", choices=["flux", "sd3"], default="flux", help="FLUX.1 or SD3-medium"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--dtype", default="fp32", help="text encoders' dtype: fp32 | bf16 | fp16")
    parser.add_argument("--t5-layers", type=int, default=2, help="of T5-XXL's 24 (default 2)")
    parser.add_argument("--blocks", type=int, default=0, help="joint/single transformer blocks")
    parser.add_argument("--erase", type=int, default=2, help="artists erased (× 6 prompts)")
    parser.add_argument("--preserve", type=int, default=10, help="artists preserved")
    parser.add_argument("--alignment", choices=["paper", "last-token"], default="paper")
    parser.add_argument("--formats", default="delta,operator", help="comma-separated")
    parser.add_argument(
        "--save-dtype", default="fp32", choices=["fp32", "bf16"], help="weights on disk"
    )
    parser.add_argument("--work", type=Path, help="keep the model here (reused when present)")
    args = parser.parse_args()

    from uce_cli.commands.apply import run_apply
    from uce_cli.edit.plan import plan_recipe
    from uce_cli.families.model import DTYPES

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="uce-bench-flux-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        model = work / f"{args.family}-t5x{args.t5_layers}-b{args.blocks}-{args.save_dtype}"
        t0 = time.perf_counter()
        if not (model / "model_index.json").is_file():
            build = build_sd3 if args.family == "sd3" else build_model
            build(model, args.t5_layers, args.blocks, DTYPES[args.save_dtype])
        build_s = time.perf_counter() - t0
        names = [
            f"Artist Number {chr(65 + i % 26)}{chr(97 + i // 26 % 26)}"
            for i in range(args.erase + args.preserve)
        ]
        recipe = work / "recipe.yaml"
        recipe.write_text(
            RECIPE.format(
                model=model,
                alignment=args.alignment,
                concepts=json.dumps(names[: args.erase]),
                preserve=json.dumps(names[args.erase :]),
                formats=", ".join(args.formats.split(",")),
            )
        )
        plan = plan_recipe(recipe)
        out = work / "out"
        t0 = time.perf_counter()
        result = run_apply(
            plan, out=out, force=True, device=args.device, dtype=args.dtype, use_cache=False
        )
        wall = time.perf_counter() - t0
        log = result.log
        layers = log["layers"]
        t5_s = time_t5(model, plan.prompts(), args.device, args.dtype, args.family)
        encode_s = log["timings"]["encode"]
        report = {
            "family": log["base_model"]["family"],
            "device": log["device"],
            "dtype": log["dtype"],
            "t5_layers_built": args.t5_layers,
            "unique_prompts": len(plan.prompts()),
            "edit_vectors": log["plan"]["edit_vectors"],
            "preserve_vectors": log["plan"]["preserve_vectors"],
            "edited_tensors": len(layers),
            "edited_parameters": sum(v["shape"][0] * v["shape"][1] for v in layers.values()),
            "layers": {k: v["shape"] for k, v in layers.items()},
            "operator_bytes_per_group": {
                g: v["width"] ** 2 * 8 for g, v in log["solver"]["groups"].items()
            },
            "apply_wall_s": round(wall, 2),
            "timings_s": log["timings"],
            "t5_forward_s": round(t5_s, 2),
            # the encode stage with T5's other layers added at the measured per-layer cost
            "encode_s_scaled_to_24_t5_layers": round(
                encode_s + t5_s * (24 - args.t5_layers) / args.t5_layers, 1
            ),
            "model_build_s": round(build_s, 1),
            "outputs_bytes": {k: (out / k).stat().st_size for k in log["outputs"]},
        }
        print(json.dumps(report, indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
