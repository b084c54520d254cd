"""Measure `uce apply` on a PixArt-α (or Sana) model of the real architecture with random weights.

Builds (or, with ``--work``, reuses) a folder whose text path has the real shapes — T5 v1.1 XXL
(d_model 4096, 64 heads, gated-GELU, 32128-token vocabulary) for PixArt-α XL-2-1024-MS, Gemma 2 2B
(2304-d, 256000-token vocabulary) for Sana 1600M — with ``--text-layers`` of the encoder's layers
(default 2 on a CPU; ``--text-layers full`` builds all 24 / 26, 19 GB / 10 GB in fp32), and the
transformer's caption projection (and Sana's caption norm) and every block's attn2 k/v at their
real shapes. By default the transformer file holds only those tensors (all that `uce apply`
reads; the output is then the delta format); ``--full-denoiser`` builds the whole transformer
(PixArt-α 611 M parameters) so the diffusers-folder output is written too. The tokenizer is uce's
generated one (its vocabulary splits rare words into letters, so prompts are longer in tokens
than with the real tokenizer; Sana's instruction is 757 tokens here, far fewer with Gemma's
256k-piece vocabulary).

Prints the editable tensor count and parameters, the operator size, the time of `run_apply`
(erase E artists with art templates, preserve P others, paper mode) and its peak RSS, then one
JSON object. Measured on the 2-core CPU machine (shared, so encode times are pessimistic):
PixArt-α with 2 of 24 T5 layers, E=5, P=50 (82 prompts): apply 226 s (encode 207, solve 13);
Sana with 1 of 26 Gemma layers, E=5, P=10 (42 prompts): apply 304 s (encode 225, solve 57). Usage:
    python scripts/bench_pixart.py                       # PixArt-α, 2 T5 layers, CPU
    python scripts/bench_pixart.py --family sana
    python scripts/bench_pixart.py --device cuda --text-layers full --full-denoiser
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from uce_cli.weights.full_size import randomized

PIXART_ALPHA = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=72,
    caption_channels=4096,
    cross_attention_dim=1152,
    in_channels=4,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    norm_type="ada_norm_single",
    num_attention_heads=16,
    num_embeds_ada_norm=1000,
    num_layers=28,
    out_channels=8,
    patch_size=2,
    sample_size=128,
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
SANA_1600M = dict(
    attention_bias=False,
    attention_head_dim=32,
    caption_channels=2304,
    cross_attention_dim=2240,
    cross_attention_head_dim=112,
    in_channels=32,
    mlp_ratio=2.5,
    num_attention_heads=70,
    num_cross_attention_heads=20,
    num_layers=20,
    out_channels=32,
    patch_size=1,
    sample_size=32,
)
GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
FAMILIES = {
    "pixart": ("PixArtAlphaPipeline", "PixArtTransformer2DModel", PIXART_ALPHA, "T5EncoderModel"),
    "sana": ("SanaPipeline", "SanaTransformer2DModel", SANA_1600M, "Gemma2Model"),
}


def build_model(dest: Path, family: str, text_layers: int | None, full_denoiser: bool) -> Path:
    """Write the random folder (see the module docstring) at ``dest`` unless it exists."""
    if (dest / "model_index.json").is_file():
        return dest
    import diffusers
    import torch
    import transformers
    from safetensors.torch import save_file

    from uce_cli.weights.tiny_transformers import (
        build_tiny_gemma_tokenizer,
        build_tiny_t5_tokenizer,
    )

    pipeline, transformer_class, transformer_config, encoder_class = FAMILIES[family]
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".bench-build-"))
    if family == "pixart":
        tokenizer = build_tiny_t5_tokenizer(120)
        text_config = transformers.T5Config(**{**T5_XXL, "num_layers": text_layers or 24})
        vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 32, 32), norm_num_groups=32,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
        scheduler = diffusers.DPMSolverMultistepScheduler()
        extra = {"caption_projection."}
    else:
        tokenizer = build_tiny_gemma_tokenizer()
        text_config = transformers.Gemma2Config(
            **{**GEMMA2_2B, "num_hidden_layers": text_layers or 26}
        )
        vae = diffusers.AutoencoderDC(
            latent_channels=32, encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
            encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
        )  # fmt: skip
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        extra = {"caption_projection.", "caption_norm."}
    tokenizer.save_pretrained(tmp / "tokenizer")
    with torch.device("meta"):
        encoder = getattr(transformers, encoder_class)(text_config)
    encoder = randomized(encoder)
    encoder.tie_weights()  # T5 shares its embedding between `shared` and the encoder
    encoder.save_pretrained(tmp / "text_encoder")
    del encoder
    vae.save_pretrained(tmp / "vae")
    scheduler.save_pretrained(tmp / "scheduler")
    with torch.device("meta"):
        transformer = getattr(diffusers, transformer_class)(**transformer_config)
    if full_denoiser:
        randomized(transformer).save_pretrained(tmp / "transformer")
    else:
        # only what uce reads: the caption path and every attn2 k/v, at their real shapes
        (tmp / "transformer").mkdir()
        transformer.save_config(tmp / "transformer")
        kept = {}
        for name, p in transformer.named_parameters():
            if name.startswith(tuple(extra)) or ".attn2.to_k." in name or ".attn2.to_v." in name:
                kept[name] = torch.empty(p.shape).normal_(0.0, 0.02)
                if name.endswith("bias"):
                    kept[name].zero_()
                if name == "caption_norm.weight":
                    kept[name].fill_(1.0)
        save_file(kept, str(tmp / "transformer" / "diffusion_pytorch_model.safetensors"))
    del transformer
    index = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", encoder_class],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "transformer": ["diffusers", transformer_class],
        "vae": ["diffusers", type(vae).__name__],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    os.replace(tmp, dest)
    return dest


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Build the model, run ``uce apply`` once, return the figures."""
    from safetensors import safe_open

    from uce_cli.commands.apply import run_apply
    from uce_cli.edit.plan import plan_recipe

    layers = None if args.text_layers == "full" else int(args.text_layers)
    started = time.perf_counter()
    model = build_model(
        work / f"{args.family}-{args.text_layers}-{'full' if args.full_denoiser else 'kv'}",
        args.family, layers, args.full_denoiser,
    )  # fmt: skip
    build_s = time.perf_counter() - started
    shapes = {}
    with safe_open(str(model / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            if ".attn2.to_k.weight" in key or ".attn2.to_v.weight" in key:
                shapes[key] = tuple(f.get_slice(key).get_shape())
    width = next(iter(shapes.values()))[1]
    artists = [f"Artist Number {i} Of The Benchmark" for i in range(args.erase + args.preserve)]
    formats = ["delta", "diffusers"] if args.full_denoiser else ["delta"]
    recipe = work / "recipe.yaml"
    recipe.write_text(
        f"model: {model}\nerase:\n  - concepts: {json.dumps(artists[: args.erase])}\n"
        f"    templates: art\npreserve:\n  - concepts: {json.dumps(artists[args.erase :])}\n"
        f"output: {{formats: {json.dumps(formats)}}}\n"
    )
    plan = plan_recipe(recipe)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    run_apply(plan, out=out, device=args.device, dtype=args.dtype, use_cache=False)
    apply_s = time.perf_counter() - started
    return {
        "family": args.family,
        "text_layers": args.text_layers,
        "device": args.device,
        "dtype": args.dtype,
        "kv_tensors": len(shapes),
        "kv_parameters": sum(a * b for a, b in shapes.values()),
        "width": width,
        "operator_bytes_fp64": width * width * 8,
        "erase": args.erase,
        "preserve": args.preserve,
        "formats": formats,
        "build_s": round(build_s, 1),
        "apply_s": round(apply_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="pixart")
    parser.add_argument("--text-layers", default="2", help="encoder layers built, or 'full'")
    parser.add_argument("--full-denoiser", action="store_true", help="build the whole transformer")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--dtype", default="fp32", help="encoder dtype: fp32 | fp16 | bf16 | auto")
    parser.add_argument("--erase", type=int, default=5, help="artists to erase (E)")
    parser.add_argument("--preserve", type=int, default=50, help="artists to preserve (P)")
    parser.add_argument("--work", type=Path, help="keep the model here (default: a temp folder)")
    args = parser.parse_args()
    if args.text_layers != "full" and not args.text_layers.isdigit():
        parser.error(f"--text-layers {args.text_layers}: a number or 'full'")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        figures = measure(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="uce-bench-pixart-") as tmp:
            figures = measure(args, Path(tmp))
    for key, value in figures.items():
        print(f"{key:>20}  {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
