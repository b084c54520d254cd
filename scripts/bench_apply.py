"""Benchmark `uce apply` against its cost floor, a naive per-layer baseline and a full pipeline load.

Builds (or, with ``--work``, reuses) an SD-1.4-architecture pipeline with random weights — the SD 1.4 UNet config
and the CLIP ViT-L/14 text config, with uce's generated tokenizer — then measures, each part in
its own child process so peak RSS is its own:

  (a) apply: `run_apply` erasing E artists (art templates, paper mode) while preserving P others;
  (b) floor: load the text encoder, one batched encode of exactly the same unique prompts, read
      the 32 cross-attention k/v tensors;
  (c) naive: the published reference's structure (for each layer: re-encode every (source, guide)
      pair and every preserve prompt, rank-1 sums in Python loops, explicit inverse) on 2 of the
      32 layers, extrapolated linearly to 32;
  (b2) a plain copy of the base folder: what writing any full diffusers output costs on this disk;
  (d) the peak RSS of loading the full pipeline the usual way (`StableDiffusionPipeline.from_pretrained`,
      then reading every weight once, as any use of it does).

  (e) with a LoRA format (``--formats lora`` or ``lora-kohya``): the LoRA factors of every layer
      from the apply's operator, two ways side by side in one process — per layer (ΔW = W_old(K − I)
      then its own float64 SVD, the way uce did it before) and shared (K − I factored once per
      group, then one GEMM per layer, what `uce apply` does now) — with their ratio and the largest
      difference between the two ΔW they give (the apply then also writes the operator format).

(a) and (b) run after one unmeasured pass of (b), so neither pays alone for a cold start (a model
still being written back to disk, libraries not yet read).

Prints a table, the disk it needed, and, last, one JSON object. Usage:
    python scripts/bench_apply.py --quick
    python scripts/bench_apply.py --erase 5 --preserve 50
    python scripts/bench_apply.py --quick --formats delta --work /data/bench   # keep the model
    python scripts/bench_apply.py --arch sd21 --quick --formats delta --naive-layers 0
    python scripts/bench_apply.py --quick --formats lora,lora-kohya --naive-layers 0   # (e)

``--arch sd21`` builds Stable Diffusion 2.1's architecture instead (its UNet config: 1024-d
cross-attention, per-block head sizes, linear projections; OpenCLIP ViT-H/14 as a 23-layer
CLIPTextModel; a v-prediction DDIM scheduler): 5.2 GB in fp32, in the folder ``sd21-random-v1``.

Disk: the random SD-1.4 model takes 4.3 GB (fp32), the apply output as much again with the
diffusers format (77 MB with delta only), and (b2) copies the model once: about 13 GB
at the peak with the default formats. Without ``--work`` everything goes into a fresh temporary
folder (under $TMPDIR) that is removed on exit, also after an error, Ctrl-C or SIGTERM; with
``--work DIR`` the folder is kept, so later runs reuse its model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

from uce_cli.weights.full_size import CLIP_L_TEXT, randomized

ARTISTS_FALLBACK = [f"Artist Number {i} Of The Benchmark" for i in range(2000)]

SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD14_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1's unet/ and text_encoder/ configs): SD 1.x's
# blocks and channels, 1024-d cross-attention with per-block head sizes, linear projections and
# upcast attention; the text encoder is OpenCLIP ViT-H/14 converted to a CLIPTextModel (plain
# GELU, 23 of its 24 layers: the pipeline reads OpenCLIP's penultimate layer).
SD21_UNET = dict(
    SD14_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    upcast_attention=True,
)
SD21_VAE = dict(SD14_VAE, sample_size=768)
OPENCLIP_H_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,  # as the converted config says; CLIPTextModel has no projection layer
)
SD14_SCHEDULER = dict(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
SD21_SCHEDULER = dict(
    SD14_SCHEDULER,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
)
# name: (label, UNet, VAE, text config, tokenizer pad token, DDIMScheduler config)
ARCHS = {
    "sd14": ("SD 1.4", SD14_UNET, SD14_VAE, CLIP_L_TEXT, None, SD14_SCHEDULER),
    "sd21": ("SD 2.1", SD21_UNET, SD21_VAE, OPENCLIP_H_TEXT, "!", SD21_SCHEDULER),
}


def build_model(dest: Path, arch: str = "sd14") -> Path:
    """Write the random SD-1.4- (or ``arch``) architecture pipeline (fast init: meta device, then
    normal_)."""
    if (dest / "model_index.json").is_file():
        return dest
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from uce_cli.weights.tiny import build_tiny_tokenizer

    _, unet_config, vae_config, text_config, pad_token, scheduler = ARCHS[arch]
    torch.manual_seed(0)
    # SD 2.x's tokenizer pads with "!"; its converted text config says pad_token_id 1
    tokenizer = build_tiny_tokenizer() if pad_token is None else build_tiny_tokenizer(pad_token)

    config = CLIPTextConfig(
        **text_config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad_token is None else 1,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(config)
    pipe = StableDiffusionPipeline(
        vae=randomized(vae),
        text_encoder=randomized(text_encoder),
        tokenizer=tokenizer,
        unet=randomized(unet),
        scheduler=DDIMScheduler(**scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".bench-build-"))
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, dest)
    return dest


def child(code: str) -> dict:
    """Run code in a fresh interpreter; it prints one JSON line last (with its own peak RSS)."""
    prelude = "import json, time, sys\n"
    epilogue = (
        # VmHWM is this process's own peak; ru_maxrss would carry the parent's peak over exec.
        "\nRESULT['peak_rss_mb'] = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024\n"
        "print(json.dumps(RESULT))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def lora_factor_child(repo: str, model_dir: Path, out: Path) -> dict:
    """(e): every layer's LoRA factors from the apply's operator, per layer and shared, timed."""
    return child(
        f"""
        sys.path.insert(0, {repo!r})
        import torch
        from uce_cli.artifacts.lora import factor_operator, factorize_delta, operator_lora_factors
        from uce_cli.artifacts.operator import read_operator
        from uce_cli.families.model import open_model
        out = __import__('pathlib').Path({str(out)!r})
        model = open_model({str(model_dir)!r})
        ks = read_operator(out / 'operator.safetensors').ks
        if len(ks) == 1:  # a one-group file names no group
            ks = {{t.group: next(iter(ks.values())) for t in model.kv}}
        old = model.read_kv()
        tensor_of = {{t.key: t for t in model.kv}}
        t0 = time.perf_counter()
        per_layer = {{}}
        for key, w in old.items():
            t = tensor_of[key]
            k = ks[t.group].double()
            part = t.part(w.double()) @ (k - torch.eye(k.shape[0], dtype=torch.float64))
            per_layer[key] = factorize_delta(t.whole(torch.zeros_like(w, dtype=torch.float64), part))
        per_layer_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        shared = {{g: factor_operator(k) for g, k in ks.items()}}
        fast = {{key: operator_lora_factors(tensor_of[key].part(w), shared[tensor_of[key].group])
                 for key, w in old.items()}}
        shared_seconds = time.perf_counter() - t0
        diff = 0.0
        for key, f in fast.items():
            a = per_layer[key].up.double() @ per_layer[key].down.double()
            b = tensor_of[key].whole(torch.zeros_like(a), f.up.double() @ f.down.double())
            diff = max(diff, float((a - b).norm() / a.norm()))
        RESULT = {{'per_layer_seconds': per_layer_seconds, 'shared_seconds': shared_seconds,
                   'layers': len(old), 'max_rel_difference': diff,
                   'ranks': sorted({{f.rank for f in fast.values()}})}}
        """
    )


def disk_usage(folder: Path) -> int:
    """Bytes a folder takes on disk (allocated blocks, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that removes the folder


@contextlib.contextmanager
def work_folder(requested: Path | None) -> Iterator[Path]:
    """``--work`` as given (kept), else a fresh temporary folder removed on any exit."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested
        return
    folder = Path(tempfile.mkdtemp(prefix="uce-bench-"))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
        print(f"removed {folder}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 erase / 10 preserve; same structure"
    )
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        default="sd14",
        help="random model's architecture: sd14 (SD 1.4, CLIP ViT-L) or sd21 (SD 2.1, OpenCLIP ViT-H)",
    )
    parser.add_argument("--erase", type=int, default=5, help="artists to erase (E)")
    parser.add_argument("--preserve", type=int, default=50, help="artists to preserve (P)")
    parser.add_argument(
        "--naive-layers", type=int, default=2, help="layers the naive baseline runs"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the model and outputs, kept (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where (a) apply, (b) the floor and (c) the naive baseline encode and solve: cpu | cuda",
    )
    parser.add_argument(
        "--formats",
        default="diffusers,delta",
        help="output formats of the apply run, comma-separated (e.g. delta)",
    )
    args = parser.parse_args()
    if args.quick:
        args.erase, args.preserve = 2, 10
    with work_folder(args.work) as work:
        run_benchmark(args, work)


def run_benchmark(args: argparse.Namespace, work: Path) -> None:
    """Build (or reuse) the model in ``work``, measure every part, print the table and JSON."""
    model = build_model(work / f"{args.arch}-random-v1", args.arch)
    disk = {"model": disk_usage(model)}
    names = ARTISTS_FALLBACK
    erase, preserve = names[: args.erase], names[args.erase : args.erase + args.preserve]
    formats = args.formats.split(",")
    lora = any(name.startswith("lora") for name in formats)
    if lora and "operator" not in formats:
        formats.append("operator")  # (e) factors the LoRA from the apply's own operator
    recipe = work / "bench-recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": str(model),
                "alignment": "paper",
                "erase": [{"concepts": erase, "templates": "art", "guide": "art"}],
                "preserve": [{"concepts": preserve}],
                "output": {"formats": formats},
            }
        )
    )
    out = work / "bench-out"
    repo = str(Path(__file__).resolve().parents[1])

    floor_code = f"""
        sys.path.insert(0, {repo!r})
        import torch
        from uce_cli.edit.plan import plan_recipe
        from uce_cli.families.model import open_model, load_text_encoder
        from uce_cli.edit.encode import encode_batches
        plan = plan_recipe(__import__('pathlib').Path({str(recipe)!r}))
        t0 = time.perf_counter()
        m = open_model(plan.model)
        dev = torch.device({args.device!r})
        tok, enc = load_text_encoder(m, dev, torch.float32)
        n = 0
        for batch, hidden in encode_batches(tok, enc, plan.prompts(), 32):
            n += len(batch)
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        kv = m.read_kv()
        RESULT = {{'seconds': time.perf_counter() - t0, 'prompts': n, 'kv_tensors': len(kv),
                   'kv_parameters': sum(t.numel() for t in kv.values()),
                   'kv_width': next(iter(kv.values())).shape[1]}}
        """
    # Unmeasured warm-up: a freshly built model is still being written back to disk, and the
    # first process to import the libraries and read the weights pays for that; (a) and (b)
    # then start from the same warm state.
    os.sync()
    child(floor_code)
    apply = child(
        f"""
        sys.path.insert(0, {repo!r})
        from uce_cli.edit.plan import plan_recipe
        from uce_cli.commands.apply import run_apply
        plan = plan_recipe(__import__('pathlib').Path({str(recipe)!r}))
        t0 = time.perf_counter()
        result = run_apply(plan, out=__import__('pathlib').Path({str(out)!r}), force=True, device={args.device!r}, dtype='fp32', use_cache=False)
        RESULT = {{'seconds': time.perf_counter() - t0, 'stages': result.log['timings'],
                   'prompts': result.log['plan']['unique_prompts']}}
        """
    )
    disk["apply_output"] = disk_usage(out)
    factors = lora_factor_child(repo, model, out) if lora else None
    floor = child(floor_code)
    skip_naive = {
        "seconds": None,
        "seconds_measured": 0.0,
        "layers_measured": 0,
        "layers_total": 32,
        "encoder_passes_total": 0,
        "peak_rss_mb": 0.0,
    }
    naive = (
        skip_naive
        if args.naive_layers == 0
        else child(
            f"""
        sys.path.insert(0, {repo!r})
        import torch
        from uce_cli.edit.plan import plan_recipe
        from uce_cli.families.model import open_model, load_text_encoder
        plan = plan_recipe(__import__('pathlib').Path({str(recipe)!r}))
        m = open_model(plan.model)
        dev = torch.device({args.device!r})
        tok, enc = load_text_encoder(m, dev, torch.float32)
        keys = [t.key for t in m.kv]
        layers = {args.naive_layers}
        weights = m.read_kv(keys[:layers])
        def embed(texts):
            ids = tok(texts, padding='max_length', max_length=77, truncation=True, return_tensors='pt')
            with torch.no_grad():
                return enc(ids.input_ids.to(dev))[0], ids.attention_mask.sum(1) - 2
        passes = 0
        t0 = time.perf_counter()
        for key in keys[:layers]:
            W = weights[key].double().to(dev)
            mat1 = 0.5 * W.clone(); mat2 = 0.5 * torch.eye(W.shape[1], dtype=torch.float64, device=dev)
            for pair in plan.pairs:
                h, f = embed([pair.source, pair.targets[0][0]]); passes += 2
                k = 77 - int(max(f))
                c = h[0, int(f[0]):int(f[0]) + k].double(); t = h[1, int(f[1]):int(f[1]) + k].double()
                for c_i, t_i in zip(c, t):
                    mat1 += torch.outer(W @ t_i, c_i); mat2 += torch.outer(c_i, c_i)
            for p in plan.preserve:
                h, _ = embed([p]); passes += 1
                for c_j in h[0].double():
                    mat1 += plan.preserve_scale * torch.outer(W @ c_j, c_j)
                    mat2 += plan.preserve_scale * torch.outer(c_j, c_j)
            W_new = mat1 @ torch.inverse(mat2)
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        RESULT = {{'seconds_measured': seconds, 'layers_measured': layers, 'layers_total': len(keys),
                   'seconds': seconds * len(keys) / layers, 'encoder_passes_total': passes * len(keys) // layers}}
        """
        )
    )
    copy = child(
        f"""
        import os, shutil
        dest = {str(work / "bench-copy")!r}
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.perf_counter()
        shutil.copytree({str(model)!r}, dest)
        RESULT = {{'seconds': time.perf_counter() - t0,
                   'bytes': sum(os.lstat(os.path.join(r, n)).st_blocks * 512
                                for r, _, ns in os.walk(dest) for n in ns)}}
        shutil.rmtree(dest)
        """
    )
    disk["copy"] = copy["bytes"]
    peak_gb = sum(disk.values()) / 1e9
    full = child(
        f"""
        from diffusers import StableDiffusionPipeline
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained({str(model)!r}, safety_checker=None, requires_safety_checker=False)
        # safetensors weights are memory-mapped lazily; any use of the pipeline reads them all
        for part in (pipe.unet, pipe.text_encoder, pipe.vae):
            for p in part.parameters():
                p.data.sum()
        RESULT = {{'seconds': time.perf_counter() - t0}}
        """
    )

    summary = {
        "arch": args.arch,
        "E": args.erase,
        "P": args.preserve,
        "unique_prompts": apply["prompts"],
        "kv_tensors": floor["kv_tensors"],
        "kv_parameters": floor["kv_parameters"],
        "operator_bytes": floor["kv_width"] ** 2 * 8,
        "apply_seconds": round(apply["seconds"], 3),
        "apply_stages": apply["stages"],
        "floor_seconds": round(floor["seconds"], 3),
        "naive_seconds_extrapolated": naive["seconds"] and round(naive["seconds"], 1),
        "naive_layers_measured": naive["layers_measured"],
        "naive_encoder_passes": naive["encoder_passes_total"],
        "apply_over_floor": round(apply["seconds"] / floor["seconds"], 3),
        "copy_base_seconds": round(copy["seconds"], 3),
        "apply_over_floor_plus_copy": round(
            apply["seconds"] / (floor["seconds"] + copy["seconds"]), 3
        ),
        "naive_over_apply": naive["seconds"] and round(naive["seconds"] / apply["seconds"], 1),
        "apply_peak_rss_mb": round(apply["peak_rss_mb"]),
        "floor_peak_rss_mb": round(floor["peak_rss_mb"]),
        "full_pipeline_peak_rss_mb": round(full["peak_rss_mb"]),
        "rss_ratio": round(apply["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "formats": args.formats,
        "lora_per_layer_seconds": factors and round(factors["per_layer_seconds"], 3),
        "lora_shared_seconds": factors and round(factors["shared_seconds"], 3),
        "lora_per_layer_over_shared": factors
        and round(factors["per_layer_seconds"] / factors["shared_seconds"], 1),
        "lora_max_rel_difference": factors and factors["max_rel_difference"],
        "threads": os.cpu_count(),
        "device": args.device,
        "disk_peak_gb": round(peak_gb, 2),
    }
    rows = [
        (
            "(a) uce apply",
            f"{apply['seconds']:.2f} s",
            f"{apply['peak_rss_mb']:.0f} MB",
            ", ".join(f"{k} {v:.2f}" for k, v in apply["stages"].items()),
        ),
        (
            "(b) floor: encode once + read k/v",
            f"{floor['seconds']:.2f} s",
            f"{floor['peak_rss_mb']:.0f} MB",
            f"{floor['prompts']} prompts, {floor['kv_tensors']} k/v tensors "
            f"({floor['kv_parameters'] / 1e6:.1f} M parameters, d = {floor['kv_width']})",
        ),
        (
            "(b2) copy the base folder (cp -r)",
            f"{copy['seconds']:.2f} s",
            f"{copy['peak_rss_mb']:.0f} MB",
            "what writing any full diffusers output costs on this disk",
        ),
        (
            "(c) naive per-layer (extrapolated)",
            f"{naive['seconds']:.1f} s" if naive["seconds"] else "skipped",
            f"{naive['peak_rss_mb']:.0f} MB",
            f"measured {naive['seconds_measured']:.1f} s on {naive['layers_measured']} of "
            f"{naive['layers_total']} layers, linear extrapolation; {naive['encoder_passes_total']} encoder passes",
        ),
        (
            "(d) full pipeline load",
            f"{full['seconds']:.2f} s",
            f"{full['peak_rss_mb']:.0f} MB",
            "StableDiffusionPipeline.from_pretrained",
        ),
    ]
    if factors is not None:
        rows.append(
            (
                "(e) LoRA factors, per-layer SVD",
                f"{factors['per_layer_seconds']:.2f} s",
                "",
                f"{factors['layers']} layers, ΔW = W_old(K − I) then one SVD each",
            )
        )
        rows.append(
            (
                "(e) LoRA factors, shared K − I",
                f"{factors['shared_seconds']:.2f} s",
                "",
                f"one SVD per group, one GEMM per layer; per-layer/shared "
                f"{factors['per_layer_seconds'] / factors['shared_seconds']:.1f}×, ranks "
                f"{factors['ranks']}, max ‖ΔW_a − ΔW_b‖/‖ΔW‖ {factors['max_rel_difference']:.1e}",
            )
        )
    print(
        f"E={args.erase} erase artists × 6 prompts, P={args.preserve} preserve, paper mode, {ARCHS[args.arch][0]} architecture, device {args.device}"
    )
    print(f"{'part':38} {'time':>10} {'peak RSS':>10}  notes")
    for name, t, rss, notes in rows:
        print(f"{name:38} {t:>10} {rss:>10}  {notes}")
    print(
        f"apply/floor {summary['apply_over_floor']}  "
        f"apply/(floor+copy) {summary['apply_over_floor_plus_copy']}  "
        f"naive/apply {summary['naive_over_apply']}  "
        f"rss apply/full {summary['rss_ratio']}"
    )
    print(
        f"disk: {peak_gb:.1f} GB at the peak in {work} (model {disk['model'] / 1e9:.1f} GB, "
        f"apply output {disk['apply_output'] / 1e9:.2f} GB, copy {disk['copy'] / 1e9:.1f} GB)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
