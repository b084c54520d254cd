"""Compare UCE's least-squares solve with the null-space solve (issue 18), side by side.

For each model and each number of erased artists E, one erase recipe (art templates, guide "art",
in each alignment mode of ``--alignments``) is solved three ways on the same statistics:

  least-squares        UCE's closed form, preserving P other artists (bare names);
  null-space           the update restricted to the preserve Gram's low-eigenvalue directions;
  null-space+auto      the same, preserving only the ``--auto-top`` of the P candidates the plain
                       edit moves most (``preserve: {auto: {top: N}}``).

With ``--augment COPIES,SCALE,DIRECTIONS`` (seed 0) four more rows per size: least-squares+auto,
both methods' auto rows again with the chosen vectors' seeded perturbations
(``auto: {top: N, augment: …}``, "+dpa": docs/design.md §8), and a control, least-squares+auto+dup:
the same number of copies with scale 0 (which the shared weight turns back into plain auto, up to
rounding: a check that the "+dpa" change comes from the perturbations).

and judged with ``uce eval``'s text-side figures (docs/metrics.md): efficacy (all aligned
positions) and efficacy_word (the last word token) on held-out phrasings of the erased artists
("a painting in the style of X" → guide "art"), drift_preserve on the P preserved artists (all 77
positions of each, as ``uce eval`` measures it), drift_unrelated on U other artists; plus the
drift of the preserve vectors themselves (the vectors the solver constrains: all positions in
paper mode, the last word in last-token mode, from the full P set's Gram matrix), the kept rank
(free directions of the update) and the solve time (solve_edit, and for auto the measurement
that chooses the preserve set). Artists come from the shipped 1,734-artist list,
shuffled with a fixed seed: the first max(E) are the erase pool, the next P preserved, the next U
unrelated.

Models: ``tiny`` (the builtin tiny SD, 32-d text) and ``sd14`` (SD 1.4's architecture with random
weights, CLIP ViT-L/14's text config: 768-d, 77 tokens; built as scripts/bench_apply.py builds it,
4.3 GB on disk, reused from ``--work``). Every prompt is encoded once per model (a per-prompt
cache in front of the text path). Prints a table and writes JSON and one plot. Usage:

    python scripts/compare_solvers.py --models tiny --sizes 1,10,100,1000
    python scripts/compare_solvers.py --models sd14 --sizes 1,10,100 --work /data/bench \\
        --json docs/compare-solvers.json --plot docs/compare-solvers.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from uce_cli.edit.autopreserve import choose_preserve, drift_forms, with_preserved
from uce_cli.edit.nullspace import NoFreeDirectionError
from uce_cli.edit.plan import plan_recipe
from uce_cli.edit.recipe import AugmentPreserve
from uce_cli.edit.solve import Scales, solve_edit
from uce_cli.edit.stats import EditStats, collect_statistics
from uce_cli.families.base import TextPath, Tokens
from uce_cli.families.model import open_model, open_text_path
from uce_cli.judge.text import DriftPrompt, HeldOutPrompt, TextInputs, text_figures

ARTISTS = Path(__file__).resolve().parents[1] / "uce_cli" / "data" / "artists1734.txt"
CONFIGS = ("least-squares", "null-space", "null-space+auto")
AUGMENTED = (
    "least-squares",
    "null-space",
    "least-squares+auto",
    "least-squares+auto+dpa",
    "least-squares+auto+dup",
    "null-space+auto",
    "null-space+auto+dpa",
)
HELDOUT_TEMPLATE = "a painting in the style of {}"


class CachedTextPath(TextPath):
    """A text path that encodes each prompt once (always padded to the full length: exact for the
    causal CLIP encoders, whose positions up to the last word do not see what follows)."""

    def __init__(self, inner: TextPath) -> None:
        self.inner = inner
        self.groups = inner.groups
        self.max_tokens = inner.max_tokens
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        self.encoded = 0

    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        return self.inner.tokens(prompts)

    def encode(
        self, prompts: Sequence[str], padding: str = "max_length"
    ) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for i in range(0, len(missing), 32):
            batch = missing[i : i + 32]
            hidden = self.inner.encode(batch, "max_length")
            for j, prompt in enumerate(batch):
                self.cache[prompt] = {g: h[j].clone() for g, h in hidden.items()}
            self.encoded += len(batch)
        return {g.name: torch.stack([self.cache[p][g.name] for p in prompts]) for g in self.groups}


def build(model: str, work: Path) -> Path:
    """The model folder: the tiny SD, or SD 1.4's architecture with random weights."""
    if model == "tiny":
        from uce_cli.weights.tiny import write_tiny_model

        dest = work / "tiny-sd"
        return dest if (dest / "model_index.json").is_file() else write_tiny_model(dest, seed=0)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_apply import build_model  # noqa: PLC0415 - the benches' one builder

    return build_model(work / "sd14-random-v1", "sd14")


def recipe(
    folder: Path, model: Path, erased: list[str], preserve: list[str], auto: int, alignment: str
) -> Path:
    """An erase recipe: the erased artists, and the preserve list (as candidates with ``auto``)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"model: {model}",
        f"alignment: {alignment}",
        "erase:",
        f"  - concepts: {json.dumps(erased)}",
        "    templates: art",
        "    guide: art",
        "preserve:",
        f"  - concepts: {json.dumps(preserve)}",
    ]
    if auto:
        lines.append(f"    auto: {{top: {auto}}}")
    path = folder / f"erase-{alignment}-{len(erased)}{'-auto' if auto else ''}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def statistics(path: Path, text_path: CachedTextPath) -> tuple[Any, EditStats]:
    """The plan and its (one group's) statistics."""
    plan = plan_recipe(path)
    stats, _, _ = collect_statistics(plan, text_path, torch.device("cpu"))
    [(_, group_stats)] = stats.items()
    return plan, group_stats


def run_model(
    name: str, args: argparse.Namespace, work: Path, save: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Every (alignment, size, config) row of one model; ``save`` gets the rows after each size."""
    folder = build(name, work)
    model = open_model(str(folder))
    keys = [t.key for t in model.kv]
    old = model.read_kv(keys)
    text_path = CachedTextPath(open_text_path(model, torch.device("cpu"), torch.float32))
    rows = []
    for alignment in args.alignments:
        rows += run_alignment(name, folder, old, text_path, alignment, args, work, save, rows)
    return rows


def run_alignment(
    name: str,
    folder: Path,
    old: dict[str, torch.Tensor],
    text_path: CachedTextPath,
    alignment: str,
    args: argparse.Namespace,
    work: Path,
    save: Callable[[list[dict[str, Any]]], None],
    earlier: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every (size, config) row of one model and alignment mode."""
    artists = [a.strip() for a in ARTISTS.read_text().splitlines() if a.strip()]
    random.Random(0).shuffle(artists)
    sizes = [s for s in args.sizes if s <= len(artists) - args.preserve - args.unrelated]
    pool = artists[: max(sizes)]
    preserve = artists[max(sizes) : max(sizes) + args.preserve]
    unrelated = artists[max(sizes) + args.preserve : max(sizes) + args.preserve + args.unrelated]
    rows = []
    for size in sizes:
        erased = pool[:size]
        shown = erased[: args.heldout]
        inputs = TextInputs(
            heldout=[HeldOutPrompt(HELDOUT_TEMPLATE.format(a), a, "art") for a in shown],
            preserved=[DriftPrompt(a, "preserved") for a in preserve],
            unrelated=[DriftPrompt(a, "unrelated") for a in unrelated],
        )
        t0 = time.perf_counter()
        plan, stats = statistics(
            recipe(work / "recipes", folder, erased, preserve, 0, alignment), text_path
        )
        auto_plan, auto_stats = statistics(
            recipe(work / "recipes", folder, erased, preserve, args.auto_top, alignment), text_path
        )
        encode_s = time.perf_counter() - t0
        for config in AUGMENTED if args.augment else CONFIGS:
            method = config.split("+")[0]
            # λ, s_e, s_p as each recipe resolves them (s_p auto: max(0.1, 1/(1+|P|)))
            used = auto_plan if "+auto" in config else plan
            scales = Scales(used.lam, used.erase_scale, used.preserve_scale, method, args.threshold)
            choose_s = 0.0
            group_stats = stats
            chosen: list[str] = []
            if "+auto" in config:
                t0 = time.perf_counter()
                plain, _, _ = solve_edit(old, auto_stats, scales)
                forms = {text_path.groups[0].name: drift_forms(old, plain)}
                [candidates] = auto_plan.auto_preserve
                if config.endswith(("+dpa", "+dup")):  # dup: the same copies unperturbed (control)
                    copies, scale, directions = args.augment
                    scale = scale if config.endswith("+dpa") else 0.0
                    dpa = AugmentPreserve(copies=copies, scale=scale, directions=directions)
                    candidates = dataclasses.replace(candidates, augment=dpa)
                choice = choose_preserve(candidates, text_path, alignment, forms)
                group = text_path.groups[0].name
                group_stats = with_preserved(
                    auto_stats, choice.rows[group], choice.counts.get(group)
                )
                chosen = choice.chosen
                choose_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                new, _, metrics = solve_edit(old, group_stats, scales)
            except NoFreeDirectionError:
                print(
                    f"{name:6} {alignment:10} {size:>5} {config:22} no free direction", flush=True
                )
                continue
            solve_s = time.perf_counter() - t0
            figures = text_figures(inputs, text_path, old, new)["figures"]
            first = next(iter(metrics.values()))
            # the constraint itself: the full preserve set's vectors as the solver reads them
            # (stats.G_p: all P artists, and "" in paper mode), pooled over layers
            moved = sum(_trace(new[k].double() - w.double(), stats.G_p) for k, w in old.items())
            base = sum(_trace(w.double(), stats.G_p) for w in old.values())
            rows.append(
                {
                    "model": name,
                    "alignment": alignment,
                    "erased": size,
                    "config": config,
                    "threshold": args.threshold if method == "null-space" else None,
                    "preserved": len(preserve),
                    "efficacy": figures["efficacy"],
                    "efficacy_word": figures["efficacy_word"],
                    "drift_preserve_vectors": (moved / base) ** 0.5,
                    "drift_preserve": figures["drift_preserve"],
                    "drift_unrelated": figures["drift_unrelated"],
                    "kept_rank": int(first.get("kept_rank", stats.width)),
                    "width": stats.width,
                    "solve_s": round(solve_s, 4),
                    "choose_s": round(choose_s, 4),
                    "chosen": len(chosen),
                    "edit_vectors": group_stats.n_edit_vectors,
                    "preserve_vectors": group_stats.n_preserve_vectors,
                }
            )
            print(_line(rows[-1]), flush=True)
        save(earlier + rows)
        print(f"  (statistics for E={size}: {encode_s:.1f} s; prompts encoded so far "
              f"{text_path.encoded})", flush=True)  # fmt: skip
    return rows


def _trace(w: torch.Tensor, g: torch.Tensor) -> float:
    """tr(W G Wᵀ) = ‖W C‖²_F for G = C Cᵀ."""
    return float(((w @ g) * w).sum())


HEADER = (
    f"{'model':6} {'align':10} {'E':>5} {'config':22} {'effic':>7} {'eff_wd':>7} {'drift_P':>9} "
    f"{'drift_pres':>10} {'drift_unrel':>11} {'kept':>9} {'solve s':>8} {'choose s':>8}"
)


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['model']:6} {r['alignment']:10} {r['erased']:>5} {r['config']:22} "
        f"{r['efficacy']:>7.3f} {r['efficacy_word']:>7.3f} {r['drift_preserve_vectors']:>9.2e} "
        f"{r['drift_preserve']:>10.2e} {r['drift_unrelated']:>11.2e} "
        f"{str(r['kept_rank']) + '/' + str(r['width']):>9} {r['solve_s']:>8.3f} {r['choose_s']:>8.2f}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown (for docs)."""
    out = [
        "| model | alignment | erased | solver | efficacy | efficacy_word | drift of preserve "
        "vectors | drift_preserve | drift_unrelated | kept rank | solve s | choose s |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['alignment']} | {r['erased']} | {r['config']} | "
            f"{r['efficacy']:.3f} | {r['efficacy_word']:.3f} | {r['drift_preserve_vectors']:.2e} | "
            f"{r['drift_preserve']:.2e} | {r['drift_unrelated']:.2e} | "
            f"{r['kept_rank']}/{r['width']} | {r['solve_s']:.3f} | {r['choose_s']:.2f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """efficacy_word, the preserve vectors' drift and drift_unrelated against the number erased: one row of panels
    per alignment mode, colour = solver, line style = model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("efficacy_word", "drift_preserve_vectors", "drift_unrelated")
    alignments = list(dict.fromkeys(r["alignment"] for r in rows))
    fig, axes = plt.subplots(len(alignments), 3, figsize=(14, 3.8 * len(alignments)), squeeze=False)
    styles = {"tiny": "--", "sd14": "-"}
    palette = (
        "tab:blue",
        "tab:orange",
        "tab:purple",
        "tab:red",
        "tab:gray",
        "tab:green",
        "tab:olive",
    )
    colors = dict(zip(AUGMENTED, palette, strict=True))
    for row, alignment in enumerate(alignments):
        lines = dict.fromkeys(
            (r["model"], r["config"]) for r in rows if r["alignment"] == alignment
        )
        for model, config in lines:
            sel = [
                r
                for r in rows
                if (r["alignment"], r["model"], r["config"]) == (alignment, model, config)
            ]
            xs = [r["erased"] for r in sel]
            for ax, key in zip(axes[row], keys, strict=True):
                ys = [r[key] if key == "efficacy_word" else max(r[key], 1e-9) for r in sel]
                ax.plot(xs, ys, styles.get(model, "-"), marker="o", color=colors[config],
                        label=f"{model}: {config}")  # fmt: skip
        for ax, key in zip(axes[row], keys, strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("artists erased")
            ax.set_title(f"{key} ({alignment})")
            if key != "efficacy_word":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.suptitle("least squares vs null space, text side (random-weight models; floor 1e-9)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Write the rows so far to ``--json`` (after every size: a long run keeps what it measured)."""
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), run or load, print, save, plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny", help="comma list of tiny, sd14")
    parser.add_argument("--sizes", default="1,10,100", help="numbers of artists erased")
    parser.add_argument("--preserve", type=int, default=200, help="artists preserved (P)")
    parser.add_argument("--unrelated", type=int, default=50, help="artists for drift_unrelated")
    parser.add_argument("--heldout", type=int, default=100, help="erased artists judged, at most")
    parser.add_argument("--auto-top", type=int, default=50, help="auto-preserve: top N of the P")
    parser.add_argument(
        "--augment",
        default=None,
        help="COPIES,SCALE,DIRECTIONS: also the auto rows with seeded perturbations (seed 0)",
    )
    parser.add_argument("--threshold", type=float, default=1e-3, help="null_space_threshold")
    parser.add_argument("--alignments", default="paper,last-token", help="comma list")
    parser.add_argument("--work", type=Path, default=None, help="keep models here (sd14: 4.3 GB)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument(
        "--load", type=Path, nargs="*", default=None, help="only table and plot these JSON files"
    )
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.alignments = args.alignments.split(",")
    if args.augment:
        copies, scale, directions = args.augment.split(",")
        args.augment = (int(copies), float(scale), int(directions))
    torch.manual_seed(0)
    if args.load:
        rows = [r for path in args.load for r in json.loads(path.read_text())["rows"]]
        print(markdown(rows))
        if args.plot:
            plot(rows, args.plot)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="uce-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for name in args.models.split(","):
            before = list(rows)
            rows += run_model(name, args, work, lambda done, b=before: _save(args, b + done))
    finally:
        if args.work is None:  # a temporary folder (the sd14 model is 4.3 GB) goes on any exit
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(markdown(rows))
    _save(args, rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
