"""Measure `uce apply` on a full-size-architecture SDXL text path: what it edits and what it costs.

Builds (or, with ``--work``, reuses) a random SDXL-base-architecture folder that holds exactly what
`uce apply` reads: both text encoders at their real configs (CLIP-L 768-d ×12 layers, OpenCLIP-bigG
1280-d ×32 layers, 49408-token embeddings; uce's generated tokenizer on both, the second padding
with "!"), the real SDXL UNet config, and a UNet weight file with only the tensors uce may edit
(the 140 attn2 k/v and add_embedding.linear_1) at their real shapes. The rest of the UNet and the
VAE are not built (configs only), so the diffusers and single-file formats are not measured here.

It then runs `run_apply` (the code behind `uce apply`) erasing E artists (art templates, paper
mode) while preserving P, delta output, once warm-up then timed, and prints: editable tensors and
parameters per group, operator sizes, the apply time and its stages, the peak RSS. Last line: JSON.

Usage:
    python scripts/bench_sdxl.py --quick                   # 2 erase / 10 preserve
    python scripts/bench_sdxl.py --erase 5 --preserve 50 --pooled --device cuda
Disk: about 3.9 GB (fp32 encoders 3.3 GB, k/v 1.4 GB) in a temporary folder removed on exit, or
kept in ``--work DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from uce_cli.weights.full_size import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, randomized

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
ARTISTS = [f"Artist Number {i} Of The Benchmark" for i in range(2000)]


def build_model(dest: Path) -> Path:
    """Write the random SDXL text path + editable UNet tensors (see the module docstring)."""
    if (dest / "model_index.json").is_file():
        return dest
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from uce_cli.families.sdxl import SdxlFamily
    from uce_cli.weights.tiny import _write_sd_tokenizer_files, build_tiny_tokenizer
    from uce_cli.weights.tiny_sdxl import build_tiny_sdxl_tokenizer_2

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".bench-sdxl-"))
    tokenizers = {"tokenizer": build_tiny_tokenizer(), "tokenizer_2": build_tiny_sdxl_tokenizer_2()}
    for name, tok in tokenizers.items():
        tok.save_pretrained(tmp / name)
        _write_sd_tokenizer_files(tmp / name)
    tok = tokenizers["tokenizer"]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for name, cls, cfg in (
        ("text_encoder", CLIPTextModel, CLIP_L_TEXT),
        ("text_encoder_2", CLIPTextModelWithProjection, OPENCLIP_BIGG_TEXT),
    ):
        config = CLIPTextConfig(
            **cfg,
            **ids,
            pad_token_id=tokenizers[name.replace("text_encoder", "tokenizer")].pad_token_id,
        )
        with torch.device("meta"):
            model = cls(config)
        randomized(model).save_pretrained(tmp / name, safe_serialization=True)
        del model
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet.save_config(tmp / "unet")
    AutoencoderKL(latent_channels=4, scaling_factor=0.13025).save_config(tmp / "vae")
    EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading").save_config(
        tmp / "scheduler"
    )
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    family = SdxlFamily(tmp, index)
    editable = {
        k: torch.randn(v.shape) * 0.02
        for k, v in unet.state_dict().items()
        if family.group_of(k) is not None
    }
    save_file(editable, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
    os.replace(tmp, dest)
    return dest


def run(model: Path, out: Path, erase: int, preserve: int, pooled: bool, device: str) -> dict:
    """One `run_apply` (delta output); its timings and sizes."""
    from uce_cli.commands.apply import run_apply
    from uce_cli.edit.plan import plan_recipe

    projections = "[to_k, to_v, add_embedding]" if pooled else "[to_k, to_v]"
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(
        f"model: {model}\n"
        f"erase:\n  - concepts: {json.dumps(ARTISTS[:erase])}\n    templates: art\n"
        f"preserve:\n  - concepts: {json.dumps(ARTISTS[erase : erase + preserve])}\n"
        f"layers: {{projections: {projections}}}\n"
        "output: {formats: [delta, operator]}\n"
    )
    plan = plan_recipe(recipe)
    shutil.rmtree(out, ignore_errors=True)  # a kept --work folder holds the last run's output
    start = time.perf_counter()
    result = run_apply(plan, out=out, device=device, use_cache=False)
    seconds = time.perf_counter() - start
    log = json.loads((result.out / "edit_log.json").read_text())
    return {"seconds": seconds, "log": log, "out": str(result.out)}


def sizes(model: Path) -> dict:
    """Editable tensors, parameters and operator size per group, from headers and configs."""
    from safetensors import safe_open

    from uce_cli.families.sdxl import SdxlFamily

    family = SdxlFamily(model, json.loads((model / "model_index.json").read_text()))
    out: dict[str, dict] = {}
    with safe_open(str(model / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            group, _ = family.group_of(key)
            d_out, d_in = f.get_slice(key).get_shape()
            cols = family.columns_of(key)
            d_in = cols[1] - cols[0] if cols else d_in
            g = out.setdefault(group, {"tensors": 0, "parameters": 0})
            g["tensors"] += 1
            g["parameters"] += d_out * d_in
    for group in family.groups():
        out[group.name]["operator"] = f"{group.width}×{group.width}"
        out[group.name]["operator_mib_fp64"] = group.width**2 * 8 / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 erase / 10 preserve")
    parser.add_argument("--erase", type=int, default=5)
    parser.add_argument("--preserve", type=int, default=50)
    parser.add_argument(
        "--pooled", action="store_true", help="also edit add_embedding's text columns"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--work", type=Path, help="keep the model here (reused by later runs)")
    args = parser.parse_args()
    erase, preserve = (2, 10) if args.quick else (args.erase, args.preserve)
    work = args.work or Path(tempfile.mkdtemp(prefix="uce-bench-sdxl-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        model = build_model(work / "sdxl-random")
        built = time.perf_counter() - t0
        figures = sizes(model)
        run(model, work / "warmup", erase, preserve, args.pooled, args.device)
        shutil.rmtree(work / "warmup", ignore_errors=True)
        timed = run(model, work / "timed", erase, preserve, args.pooled, args.device)
        rss = int([x for x in open("/proc/self/status") if x.startswith("VmHWM")][0].split()[1])
        result = {
            "device": args.device,
            "erase": erase,
            "preserve": preserve,
            "pooled": args.pooled,
            "build_seconds": round(built, 1),
            "groups": figures,
            "apply_seconds": round(timed["seconds"], 2),
            "stages": timed["log"].get("timings"),
            "peak_rss_mb": rss // 1024,
        }
        for name, g in figures.items():
            print(
                f"{name:7s} {g['tensors']:4d} tensors  {g['parameters'] / 1e6:8.2f} M parameters  "
                f"operator {g['operator']} ({g['operator_mib_fp64']:.1f} MiB fp64)"
            )
        print(
            f"uce apply ({erase} erase, {preserve} preserve, {args.device}): {timed['seconds']:.2f} s"
        )
        print(json.dumps(result))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
