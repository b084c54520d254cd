"""Benchmark `uce sample` throughput with 1 and N processes (`accelerate launch`), side by side.

Each run is the real command line (`python -m uce_cli sample … --json`, under
`accelerate launch --multi_gpu --num_processes N` for N > 1) on the same prompt set, into its own
folder. Reported per run: wall time of the command (start-up and model loading included), the
generation time uce reports (the slowest rank's), images per second of generation, and whether the
images equal the one-process run's byte for byte. Last: the projected wall time of a COCO-30k FID
run (30,000 images, 50 steps) on 8 such devices from the measured per-image time.

With ``--compare-threads`` it instead runs one process twice, side by side: with uce's default
thread count (no ``--threads``, no ``OMP_NUM_THREADS``: the CPUs the process may use) and with
``--threads 1``, and prints the per-image time of each, their ratio and the machine's load.

The model: ``builtin:tiny-sd`` with ``--quick``; otherwise a random SD-1.4-architecture pipeline
(512×512, built by scripts/bench_apply.py's builder into ``--work``). Usage:
    python scripts/bench_sample.py --quick                       # CPU, tiny model, 1 and 2 processes
    python scripts/bench_sample.py --device cuda --images 16 --steps 20 --work /data/bench
    python scripts/bench_sample.py --quick --compare-threads     # default threads vs --threads 1
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES, COCO_STEPS, COCO_DEVICES = 30_000, 50, 8


def write_prompts(path: Path, n: int) -> None:
    """A prompt CSV of ``n`` rows with their own seeds (as the upstream prompt sets have)."""
    subjects = ["a city street", "a bowl of fruit", "a mountain lake", "a portrait of a woman"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_number", "prompt", "evaluation_seed"])
        for i in range(n):
            writer.writerow([i, f"{subjects[i % len(subjects)]}, photo {i}", 1000 + i])


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, dict]:
    """Run one command; (wall seconds, the JSON summary it printed last on stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, json.loads(proc.stdout[proc.stdout.index("{") :])  # --json: the whole stdout


def image_hashes(folder: Path) -> dict[str, str]:
    """file name → sha256 of every PNG under ``folder`` (grids excluded)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.png"))
        if "grid" not in p.name
    }


def compare_threads(args: argparse.Namespace, prompts: Path, work: Path, env: dict) -> None:
    """One process, uce's default thread count vs ``--threads 1``, run alternately, side by side."""
    from uce_cli.threads import THREAD_VARS, usable_cpus

    env = {k: v for k, v in env.items() if k not in (*THREAD_VARS, "UCE_THREADS")}
    settings = {"default": [], "1": ["--threads", "1"]}
    rows = []
    for label, extra in settings.items():
        out = work / f"out-threads-{label}"
        cmd = [
            sys.executable, "-m", "uce_cli", "sample", "--model", args.model,
            "--prompts-file", str(prompts), "--out", str(out), "--steps", str(args.steps),
            "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
            "--quiet", "--json", *extra,
        ]  # fmt: skip
        load = os.getloadavg()[0]
        wall, summary = run(cmd, env)
        rows.append(
            {
                "threads": label if extra else f"default ({usable_cpus()})",
                "images": summary["generated"],
                "wall_s": round(wall, 2),
                "seconds_per_image": summary["seconds_per_image"],
                "load_average_1min_before": round(load, 2),
            }
        )
    default, one = rows
    ratio = default["seconds_per_image"] / one["seconds_per_image"]
    print(
        f"model {args.model}; device {args.device}; {args.images} images; {args.steps} steps; "
        f"{os.cpu_count()} CPUs on the machine, {usable_cpus()} usable by this process"
    )
    print(f"{'threads':>12} {'images':>6} {'wall s':>8} {'s/image':>8} {'load':>6}")
    for r in rows:
        print(
            f"{r['threads']:>12} {r['images']:>6} {r['wall_s']:>8} {r['seconds_per_image']:>8} "
            f"{r['load_average_1min_before']:>6}"
        )
    print(f"default / --threads 1 per image: {ratio:.2f}")
    print(json.dumps({"threads_runs": rows, "default_over_one_thread": round(ratio, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="builtin:tiny-sd, 8 images, 4 steps")
    parser.add_argument("--model", default=None, help="a diffusers folder (default: see above)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16")
    parser.add_argument("--images", type=int, default=8, help="prompts (one image each)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--processes", default="1,2", help="process counts, comma-separated")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every process (default on the CPU: 1, as accelerate launch sets)",
    )
    parser.add_argument(
        "--compare-threads",
        action="store_true",
        help="one process, uce's default thread count vs --threads 1, side by side",
    )
    parser.add_argument("--work", type=Path, default=None, help="kept folder (default: temporary)")
    args = parser.parse_args()
    if args.quick:
        args.model = args.model or "builtin:tiny-sd"
        args.images, args.steps = 8, 4
    work = args.work or Path(tempfile.mkdtemp(prefix="uce-bench-sample-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        sys.path.insert(0, str(REPO / "scripts"))
        from bench_apply import build_model

        args.model = str(build_model(work / "sd14-random-v1"))
    prompts = work / "prompts.csv"
    write_prompts(prompts, args.images)

    import torch

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if args.compare_threads:
        compare_threads(args, prompts, work, env)
        return
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:  # the same per process in every run, so the images compare byte for byte
        env["OMP_NUM_THREADS"] = str(threads)
    rows = []
    reference: dict[str, str] | None = None
    for n in [int(x) for x in args.processes.split(",")]:
        if args.device == "cuda" and n > max(gpus, 1):
            rows.append({"processes": n, "skipped": f"{gpus} GPU(s) visible, one process per GPU"})
            continue
        out = work / f"out-{n}"
        sample = [
            "-m", "uce_cli", "sample", "--model", args.model, "--prompts-file", str(prompts),
            "--out", str(out), "--steps", str(args.steps), "--device", args.device,
            "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--quiet", "--json",
        ]  # fmt: skip
        launch = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no",
        ]  # fmt: skip
        cmd = [*launch, *sample] if n > 1 else [sys.executable, *sample]
        wall, summary = run(cmd, env)
        hashes = image_hashes(out)
        reference = reference or hashes
        rows.append(
            {
                "processes": n,
                "images": summary["generated"],
                "wall_s": round(wall, 2),
                "generate_s": summary["seconds"],
                "images_per_s": round(summary["generated"] / summary["seconds"], 3),
                "seconds_per_image": summary["seconds_per_image"],
                "same_images_as_first_run": hashes == reference,
            }
        )
    print(
        f"model {args.model}; device {args.device}; {args.images} images; {args.steps} steps; "
        f"OMP_NUM_THREADS {env.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"{'proc':>4} {'images':>6} {'wall s':>8} {'gen s':>8} {'img/s':>7}  same as first")
    for r in rows:
        if "skipped" in r:
            print(f"{r['processes']:>4}  skipped: {r['skipped']}")
            continue
        print(
            f"{r['processes']:>4} {r['images']:>6} {r['wall_s']:>8} {r['generate_s']:>8} "
            f"{r['images_per_s']:>7}  {r['same_images_as_first_run']}"
        )
    first = next(r for r in rows if "skipped" not in r)
    per_image_50 = first["seconds_per_image"] * COCO_STEPS / args.steps
    hours = COCO_IMAGES * per_image_50 / COCO_DEVICES / 3600
    print(
        f"projection: COCO-30k ({COCO_IMAGES} images, {COCO_STEPS} steps) on {COCO_DEVICES} such "
        f"devices ≈ {hours:.2f} h ({per_image_50:.3f} s per image at {COCO_STEPS} steps, "
        "linear in steps, from the one-process run)"
    )
    print(json.dumps({"runs": rows, "coco30k_8_devices_hours": round(hours, 3)}))


if __name__ == "__main__":
    main()
