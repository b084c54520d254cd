"""Measure the debias loop (Algorithm 1): time per iteration and its split, and the per-layer solve
at SD 1.4's shapes, for projecting the published 35-profession run.

(a) loop: `run_apply` on the tiny pipeline with a tiny random CLIP judge and the published loop
    settings (5 seeds × 10 images, 20 steps, guidance 7.5), ``--items`` debias prompts, two
    iterations; prints sample / classify / solve seconds per iteration and per image.
(b) solve: one loop iteration's solve at SD 1.4's shapes with random data: 32 k/v layers
    (10×320, 10×640, 12×1280 rows, 768 columns), ``--solve-items`` norm-relative debias prompts of
    K = 74 aligned positions and 2 attributes, 77-token preserve statistics; float64 on the CPU.

Usage:
    python scripts/bench_debias.py --items 5 --images-per-seed 2 --solve-items 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def bench_loop(items: int, images_per_seed: int, iterations: int, folder: Path) -> dict:
    from uce_cli.commands.apply import run_apply
    from uce_cli.edit.plan import plan_recipe
    from uce_cli.weights.tiny import write_tiny_clip, write_tiny_model

    model = write_tiny_model(folder / "tiny-sd")
    clip = write_tiny_clip(folder / "tiny-clip")
    concepts = ["doctor", "nurse", "lawyer", "teacher", "chef", "pilot", "farmer", "baker"]
    per_concept = 5  # the bare concept + image/photo/portrait/picture of, as the published run
    chosen = concepts[: max(1, -(-items // per_concept))]
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model: {model}\n"
        "debias:\n"
        f"  - concepts: {json.dumps(chosen)}\n"
        '    templates: ["{}", "image of {}", "photo of {}", "portrait of {}", "picture of {}"]\n'
        "    attributes: {male: 0.5, female: 0.5}\n"
        "    alphas: auto\n"
        f"debias_loop: {{classifier: {clip}, max_iterations: {iterations}, "
        f"images_per_seed: {images_per_seed}, tolerance: 0.0001}}\n"
        "output: {formats: [delta]}\n"
    )
    plan = plan_recipe(recipe)
    t0 = time.perf_counter()
    log = run_apply(plan, out=folder / "out", device="cpu", use_cache=False).log
    total = time.perf_counter() - t0
    rows = []
    for record in log["debias"]["iterations"]:
        s = record["seconds"]
        rows.append(
            {
                "iteration": record["iteration"],
                "items": len(record["sampled"]),
                "images": record["images_sampled"],
                **s,
                "per_image_sample": s["sample"] / record["images_sampled"],
                "per_image_classify": s["classify"] / record["images_sampled"],
            }
        )
    return {
        "items": len(plan.pairs),
        "total_s": total,
        "timings": log["timings"],
        "iterations": rows,
    }


def bench_solve(items: int, k: int = 74, preserve_prompts: int = 35) -> dict:
    from uce_cli.edit.solve import Scales, solve_edit
    from uce_cli.edit.stats import DebiasBlock, EditStats

    torch.manual_seed(0)
    d = 768
    rows = [320] * 10 + [640] * 10 + [1280] * 12
    weights = {f"layer{i}": torch.randn(r, d) / d**0.5 for i, r in enumerate(rows)}
    blocks = [
        DebiasBlock(
            f"p{i}",
            torch.randn(k, d, dtype=torch.float64),
            torch.randn(2, k, d, dtype=torch.float64),
            (0.02, -0.02),
            True,
            torch.randn(77, d, dtype=torch.float64),
        )
        for i in range(items)
    ]
    c_s = torch.cat([b.C for b in blocks])
    c_p = torch.randn(77 * preserve_prompts, d, dtype=torch.float64)
    zeros = torch.zeros(d, d, dtype=torch.float64)
    stats = EditStats(d, c_s.T @ c_s, zeros, zeros, c_p.T @ c_p, debias=blocks)
    t0 = time.perf_counter()
    solve_edit(weights, stats, Scales(0.5, 1.0, 0.1))
    seconds = time.perf_counter() - t0
    return {"items": items, "layers": len(rows), "seconds": seconds, "per_item": seconds / items}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument("--images-per-seed", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--solve-items", type=int, default=20, help="0: skip the SD-shape solve")
    args = parser.parse_args()
    report: dict = {"load_average": os.getloadavg(), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        report["loop"] = bench_loop(args.items, args.images_per_seed, args.iterations, Path(tmp))
    print(json.dumps(report, indent=2), flush=True)
    if args.solve_items:
        report = {"solve_sd14_shapes": bench_solve(args.solve_items)}
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
