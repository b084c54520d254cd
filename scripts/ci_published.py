"""CI: every published recipe validates, dry-runs, applies on the tiny model and gets a report.

For each recipes/published/*.yaml: `uce validate`, `uce apply --dry-run --model builtin:tiny-sd`,
`uce apply --model builtin:tiny-sd`, `uce eval --images --limit N` (text side, plots, and the image
metrics that run offline). Each recipe is applied as a copy for the tiny model: with `alphas: auto`
(Algorithm 1) its `debias_loop` uses the builtin tiny CLIP judge and a one-iteration, two-image,
two-step loop (the published loop would sample 9,250 images a round); its image sets draw two
prompts (ten with imagenet_top1: one per ImageNette class, so the erased class is scored) at two
steps and are judged by the builtin tiny CLIP and ResNet (random weights: the
figures exercise the code path, not the paper's numbers); LPIPS and FID are left out (their
backbones need torchvision, which the CPU machines cannot import). The paper's expectations stay
in the report (paper vs measured) but are not checked: a tiny-model figure has no published value.
With --plots DIR, the plots of --plots-recipe are copied there (the README shows them).
Prints one line per recipe and a JSON summary; exits 1 if any recipe fails. A recipe whose eval
needs one of the two large upstream prompt sets uce fetches on demand (I2P, COCO-30k) and finds
it neither cached, in $UCE_DATA_MIRROR nor fetchable (offline) is listed as `needs-data`: the edit
itself was applied. Every other recipe must write its report (eval/eval.json): a missing report,
or a missing data file that uce ships, fails the run — so a fresh clone offline checks something.

Usage: python scripts/ci_published.py --work runs/published [--plots docs] [--only erase-artists-5] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from uce_cli.edit.upstream import FETCHED_ON_DEMAND  # noqa: E402 - after the path is set

# uce eval's one-line error for a held-out prompt set it can neither find nor fetch.
NO_DATA = "cannot download upstream data file"

# The loop settings of an `alphas: auto` recipe on the tiny model: a smoke run of the real loop.
TINY_LOOP = {
    "classifier": "builtin:tiny-clip",
    "seeds": [0],
    "images_per_seed": 2,
    "steps": 2,
    "max_iterations": 1,
}


# Image metrics whose models exist offline (builtin tiny judges, NudeNet's bundled detector).
OFFLINE_METRICS = ("clip_score", "clip_accuracy", "imagenet_top1", "nudenet", "attribute_deviation")
TINY_IMAGES = {"steps": 2, "images_per_prompt": 1}
TINY_JUDGES = {"clip_model": "builtin:tiny-clip", "imagenet_model": "builtin:tiny-resnet"}
IMAGE_LIMIT = 2  # prompts per image set (one per concept where rows name concepts)
CLASSES_LIMIT = 10  # with imagenet_top1: one prompt of each ImageNette class, the erased one too


def _tiny_evaluate(evaluate: dict, folder: Path) -> int:
    """Shrink ``evaluate`` in place for the tiny model; the prompts per set to draw (0: none)."""
    from uce_cli.edit.evalspec import IMAGE_FIGURES, METRIC_FIGURES

    sets = [evaluate] if evaluate.get("images") else []
    sets += evaluate.get("image_sets", [])
    for part in (evaluate, *evaluate.get("image_sets", [])):
        for key in ("heldout", "preserved", "unrelated"):  # local prompt files: from the recipe
            for ps in part.get(key, []):
                if not ps["file"].startswith("upstream:"):
                    ps["file"] = str((folder / ps["file"]).resolve())
    kept: set[str] = set()
    for part in sets:
        spec = part["images"] if part is evaluate else part
        if not spec["prompts"]["file"].startswith("upstream:"):
            spec["prompts"]["file"] = str((folder / spec["prompts"]["file"]).resolve())
        spec.update(TINY_IMAGES)
        if spec["prompts"].get("concept_column"):  # one row per concept: the first rows differ
            spec["prompts"]["limit"] = 1
        spec.pop("reference", None)
        part["metrics"] = [m for m in part.get("metrics", []) if m in OFFLINE_METRICS]
        kept |= {f for m in part["metrics"] for f in METRIC_FIGURES[m]}
    evaluate["image_sets"] = [s for s in evaluate.get("image_sets", []) if s["metrics"]]
    if not evaluate.get("metrics"):
        evaluate.pop("images", None)
    evaluate["expect"] = [
        e
        for e in evaluate.get("expect", [])
        if e["metric"] not in IMAGE_FIGURES or e["metric"] in kept
    ]
    evaluate.update(TINY_JUDGES)
    if not kept:
        return 0
    return CLASSES_LIMIT if "imagenet_top1" in kept else IMAGE_LIMIT


def tiny_copy(recipe: Path, work: Path) -> tuple[Path, int]:
    """A copy of the recipe in ``work`` for the tiny model (loop and image sets shrunk, see the
    module docstring), and the prompts per image set to draw (0: no image metric)."""
    data = yaml.safe_load(recipe.read_text())
    if any(group.get("alphas") == "auto" for group in data.get("debias", [])):
        data["debias_loop"] = {**data.get("debias_loop", {}), **TINY_LOOP}
    images = _tiny_evaluate(data.get("evaluate") or {}, recipe.parent)
    work.mkdir(parents=True, exist_ok=True)
    copy = work / f"{recipe.stem}.tiny.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return copy, images


def uce(*args: str) -> subprocess.CompletedProcess:
    """Run the uce CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "uce_cli", *args], capture_output=True, text=True, cwd=REPO
    )


def failure(step: str, last: str) -> tuple[str, str]:
    """Status and detail of a failed step: `needs-data` only for a fetched-on-demand prompt set
    that is not here (offline, no mirror); anything else is a failure."""
    if step == "eval" and NO_DATA in last:
        name = last.split(NO_DATA, 1)[1].strip().split("'")[1] if "'" in last else ""
        if name in FETCHED_ON_DEMAND:
            return "needs-data", last.removeprefix("error: ")
    return "FAIL", f"{step}: {last}"


def run_recipe(recipe: Path, args: argparse.Namespace) -> dict:
    """Validate, dry-run, apply and report one recipe; print its line; return its result."""
    out = args.work / recipe.stem
    t0 = time.perf_counter()
    applied, images = tiny_copy(recipe, args.work)
    image_args = ["--images", "--limit", str(images)] if images else []
    steps = [
        ("validate", ["validate", str(recipe)]),
        ("dry-run", ["apply", str(recipe), "--dry-run", "--model", "builtin:tiny-sd"]),
        ("apply", ["apply", str(applied), "--model", "builtin:tiny-sd", "--out", str(out), "--force", "-q"]),
        ("eval", ["eval", str(out), "--force", "-q", "--json", *image_args]),
    ]  # fmt: skip
    status, detail, figures = "ok", "", {}
    for name, cmd in steps:
        done = uce(*cmd)
        if done.returncode != 0:
            status, detail = failure(name, (done.stderr.strip().splitlines() or [""])[-1])
            break
        if name == "eval":
            if not (out / "eval" / "eval.json").is_file():
                status, detail = "FAIL", "eval: exit 0 but wrote no report (eval/eval.json)"
                break
            figures = json.loads(done.stdout)["figures"]
    seconds = time.perf_counter() - t0
    shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if v is not None)
    print(f"{status:15} {recipe.stem:36} {seconds:6.1f}s  {detail or shown}", flush=True)
    if args.plots and recipe.stem == args.plots_recipe and status == "ok":
        args.plots.mkdir(parents=True, exist_ok=True)
        for png in sorted((out / "eval").glob("*.png")):
            shutil.copyfile(png, args.plots / f"eval-{png.name}")
    return {
        "recipe": recipe.stem,
        "status": status,
        "seconds": round(seconds, 2),
        "figures": figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "published")
    parser.add_argument("--only", action="append", default=None, help="recipe stem(s) to run")
    parser.add_argument("--plots", type=Path, default=None, help="copy one recipe's plots here")
    parser.add_argument("--plots-recipe", default="erase-artists-5")
    parser.add_argument("--jobs", type=int, default=1, help="recipes run at the same time")
    args = parser.parse_args()
    recipes = sorted((REPO / "recipes" / "published").glob("*.yaml"))
    if args.only:
        recipes = [r for r in recipes if r.stem in args.only]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job runs uce subprocesses
        results = list(pool.map(lambda r: run_recipe(r, args), recipes))
    failed = sum(r["status"] == "FAIL" for r in results)
    print(json.dumps({"recipes": len(results), "failed": failed, "results": results}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
