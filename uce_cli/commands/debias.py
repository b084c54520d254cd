"""Algorithm 1 (paper §4.3, ``alphas: auto``): find the debias α by sampling the edited model,
classifying its images zero-shot and re-editing, as the published loop (paper-era
``train_debias.py``) does it.

Each iteration:

1. sample ``len(seeds) × images_per_seed`` images of every item (debias prompt) not yet done, with
   the *current* model; classify them against the item's attribute prompts; ratio per attribute
   (an image counts for every label at its maximum);
2. gap = max_j |ratio_j − desired_j|; stop when every gap < tolerance (no edit this round);
3. α = eta·(desired − ratio) for items with gap > tolerance, α = 0 otherwise; an item with
   gap ≤ tolerance joins the preserve list (all its positions in paper mode) and keeps its zero-α
   edit, which pins it to its current output; gap < tolerance also stops its sampling;
4. re-edit the *current* weights with these α (targets and preserve values from the current
   weights: edits compound), every other recipe edit included; swap the new k/v tensors into the
   loaded UNet in place.

Under ``accelerate launch`` every rank holds the pipeline: image j of an iteration (in the order
one process draws them) is rank j % world's; each rank classifies its images, the probabilities
are gathered, and every rank computes the same ratios; rank 0 alone solves and broadcasts the new
k/v tensors, which every rank swaps in.

Differences from the published code, on purpose: the seeds are fixed and recorded (it draws five
at random each iteration), images are batched across items, and the text side is encoded once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from uce_cli.artifacts.edits import apply_edit
from uce_cli.distributed import Ranks
from uce_cli.edit.plan import EditPlan
from uce_cli.edit.recipe import DebiasLoop
from uce_cli.edit.solve import Scales, solve_edit
from uce_cli.edit.stats import DebiasBlock, EditStats
from uce_cli.judge.classify import Classifier, label_ratios
from uce_cli.progress import NullProgress, Progress


@dataclass
class LoopItem:
    """One debias prompt of Algorithm 1 and where it stands."""

    prompt: str
    section: str
    attributes: list[str]
    labels: list[str]  # the attribute prompts: the classifier's labels
    desired: list[float]
    block: int  # index into EditStats.debias
    ratios: list[float] | None = None
    gap: float | None = None
    alphas: list[float] = field(default_factory=list)
    done: bool = False  # gap < tolerance: no longer sampled
    preserved: bool = False  # gap ≤ tolerance: joined the preserve list

    def record(self) -> dict[str, Any]:
        """This item in an iteration record of the edit log."""
        return {
            "prompt": self.prompt,
            "section": self.section,
            "ratios": dict(zip(self.attributes, self.ratios or [], strict=False)),
            "desired": dict(zip(self.attributes, self.desired, strict=True)),
            "gap": self.gap,
            "alpha": dict(zip(self.attributes, self.alphas, strict=True)),
            "converged": self.preserved,
        }


@dataclass
class LoopResult:
    """Final weights of the loop, its operator (absolute α only), metrics and record."""

    weights: dict[str, torch.Tensor]
    k: torch.Tensor | None
    metrics: dict[str, dict[str, float]]
    record: dict[str, Any]


_FIGURES = ("rel_delta", "residual_before", "residual_after", "preserve_drift")


class LoopInterrupted(KeyboardInterrupt):
    """Ctrl-C during the loop; the message says how far it got (nothing is written)."""


def loop_items(plan: EditPlan, stats: EditStats) -> list[LoopItem]:
    """The items of Algorithm 1: every ``auto`` pair, matched to its statistics block."""
    blocks = {b.source: i for i, b in enumerate(stats.debias)}
    return [
        LoopItem(
            prompt=pair.source,
            section=pair.section,
            attributes=list(pair.attributes),
            labels=[t for t, _ in pair.targets[1:]],
            desired=list(pair.desired),
            block=blocks[pair.source],
            alphas=[0.0] * len(pair.attributes),
        )
        for pair in plan.pairs
        if pair.auto
    ]


def sample_items(
    pipe: Any,
    prompts: list[str],
    loop: DebiasLoop,
    height: int,
    width: int,
    progress: Progress,
    ranks: Ranks | None = None,
) -> dict[str, list[Image.Image]]:
    """Images of every prompt with the pipeline's current weights, batched across prompts.

    Each seed's latents are drawn as the pipeline draws them for ``num_images_per_prompt =
    images_per_seed`` with one CPU generator of that seed (the published loop's call), then
    passed in as ``latents``, so a batch may mix prompts and seeds. Under a launch (``ranks``)
    only this rank's share of the images is drawn.
    """
    dtype = pipe.unet.dtype
    shape = (
        loop.images_per_seed,
        pipe.unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    jobs: list[tuple[str, torch.Tensor]] = []
    for prompt in prompts:
        for seed in loop.seeds:
            g = torch.Generator("cpu").manual_seed(seed)
            latents = torch.randn(shape, generator=g, dtype=dtype)
            jobs += [(prompt, latent) for latent in latents]
    jobs = (ranks or Ranks()).share(jobs)
    images: dict[str, list[Image.Image]] = {p: [] for p in prompts}
    progress.start(f"sampling {len(jobs)} images", total=len(jobs), unit="img")
    for start in range(0, len(jobs), loop.batch_size):
        batch = jobs[start : start + loop.batch_size]
        out = pipe(
            prompt=[p for p, _ in batch],
            latents=torch.stack([z for _, z in batch]).to(pipe.device),
            num_inference_steps=loop.steps,
            guidance_scale=loop.guidance,
            height=height,
            width=width,
            output_type="pil",
        ).images
        for (prompt, _), image in zip(batch, out, strict=True):
            images[prompt].append(image)
        progress.advance(len(batch))
    progress.finish()
    return images


def _with_alphas(stats: EditStats, items: list[LoopItem]) -> EditStats:
    blocks: list[DebiasBlock] = list(stats.debias)
    for item in items:
        blocks[item.block] = replace(blocks[item.block], alphas=tuple(item.alphas))
    return replace(stats, debias=blocks)


def run_debias_loop(
    plan: EditPlan,
    pipe: Any,
    weights: dict[str, torch.Tensor],
    stats: EditStats,
    scales: Scales,
    classifier: Classifier,
    height: int,
    width: int,
    progress: Progress | None = None,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    ranks: Ranks | None = None,
) -> LoopResult:
    """Run Algorithm 1 on a loaded pipeline and return the final k/v weights.

    Args:
        plan: the resolved plan; ``plan.loop`` holds the settings, its ``auto`` pairs are the items.
        pipe: the loaded diffusers pipeline; its UNet's k/v tensors are swapped in place each
            iteration and hold the final weights on return (the base files are never touched).
        weights: the base k/v weights (UNet keys without prefix) the edit starts from.
        stats: the edit's statistics; the ``auto`` blocks' α are set per iteration.
        scales: λ, s_e, s_p of every iteration's solve.
        classifier: images, labels → (N, J) probabilities (``ClipClassifier``, or any function).
        height: image height for sampling.
        width: image width for sampling.
        progress: stage/advance reporting.
        on_iteration: receives each iteration's record as soon as it is complete.
        ranks: this process's rank under ``accelerate launch``: images are split across ranks,
            rank 0 solves; every rank returns the same result.

    Raises:
        LoopInterrupted: Ctrl-C; says after which iteration.
    """
    assert plan.loop is not None
    loop = plan.loop
    progress = progress or NullProgress()
    ranks = ranks or Ranks()
    items = loop_items(plan, stats)
    current = dict(weights)
    k_total: torch.Tensor | None = None
    metrics: dict[str, dict[str, float]] = {}
    operator = True
    iterations: list[dict[str, Any]] = []
    stopped = "max_iterations"
    g_p = stats.G_p.clone()
    n_preserve = stats.n_preserve_vectors
    migrated: list[str] = []
    done_iterations = 0
    try:
        for iteration in range(1, loop.max_iterations + 1):
            t0 = time.perf_counter()
            todo = [item for item in items if not item.done]
            prompts = [i.prompt for i in todo]
            images = sample_items(pipe, prompts, loop, height, width, progress, ranks)
            t1 = time.perf_counter()
            probs = _classify_across_ranks(todo, images, classifier, ranks)
            for item in todo:
                ratios = label_ratios(probs[item.prompt])
                item.ratios = [float(r) for r in ratios]
                item.gap = max(abs(r - d) for r, d in zip(item.ratios, item.desired, strict=True))
            t2 = time.perf_counter()
            record: dict[str, Any] = {
                "iteration": iteration,
                "images_sampled": sum(len(v) for v in probs.values()),
                "sampled": [i.prompt for i in todo],
            }
            if max(i.gap for i in items) < loop.tolerance:  # type: ignore[type-var]
                stopped = "converged"
                record.update(
                    items=[i.record() for i in items],
                    converged=[i.prompt for i in items],
                    edited=False,
                    seconds={"sample": t1 - t0, "classify": t2 - t1, "solve": 0.0},
                )
                iterations.append(_rounded(record))
                done_iterations = iteration
                if on_iteration:
                    on_iteration(iterations[-1])
                break
            for item in items:
                assert item.gap is not None and item.ratios is not None
                if item.gap > loop.tolerance:
                    item.alphas = [
                        loop.eta * (d - r) for d, r in zip(item.desired, item.ratios, strict=True)
                    ]
                else:
                    item.alphas = [0.0] * len(item.attributes)
                    if not item.preserved and item.prompt not in plan.preserve:
                        rows = stats.debias[item.block].preserve_rows.to(g_p.device)
                        g_p += rows.T @ rows
                        n_preserve += rows.shape[0]
                        migrated.append(item.prompt)
                    item.preserved = True
                item.done = item.gap < loop.tolerance
            step = replace(_with_alphas(stats, items), G_p=g_p, n_preserve_vectors=n_preserve)
            progress.start("solve")
            current, k, metrics = _solve_on_rank_0(current, step, scales, ranks)
            apply_edit(pipe.unet, current)
            progress.finish()
            if k is None:
                operator = False
            elif operator:
                k_total = k if k_total is None else k_total @ k
            t3 = time.perf_counter()
            record.update(
                items=[i.record() for i in items],
                converged=[i.prompt for i in items if i.preserved],
                edited=True,
                seconds={"sample": t1 - t0, "classify": t2 - t1, "solve": t3 - t2},
            )
            iterations.append(_rounded(record))
            done_iterations = iteration
            if on_iteration:
                on_iteration(iterations[-1])
    except KeyboardInterrupt:
        raise LoopInterrupted(
            f"interrupted after iteration {done_iterations} of {loop.max_iterations} — "
            "nothing was written (the output is written once, when the loop ends)"
        ) from None
    if not any(r["edited"] for r in iterations):
        # Converged before any edit: the published loop leaves the model as it is; the recipe's
        # other edits (erase, moderate, fixed-α debias) are still made, once.
        if any(not pair.auto for pair in plan.pairs):
            step = replace(_with_alphas(stats, items), G_p=g_p, n_preserve_vectors=n_preserve)
            current, k_total, metrics = _solve_on_rank_0(current, step, scales, ranks)
            apply_edit(pipe.unet, current)
            operator = k_total is not None
        else:
            k_total = torch.eye(stats.width, dtype=torch.float64)
            metrics = {name: dict.fromkeys(_FIGURES, 0.0) for name in current}
    for (
        name,
        w,
    ) in current.items():  # the last solve's figures are relative to the weights before it
        w0 = weights[name].double()
        metrics[name]["rel_delta_total"] = float((w.double() - w0).norm() / w0.norm())
    return LoopResult(
        weights=current,
        k=k_total if operator else None,
        metrics=metrics,
        record={
            "settings": loop.model_dump(mode="json"),
            "stopped": stopped,
            "iterations_run": done_iterations,
            "edits": sum(1 for r in iterations if r["edited"]),
            "preserve_added": migrated,
            "final_alpha_note": "α of each iteration is a step on the previous iteration's model "
            "(edits compound, as in the published loop)",
            "seeds_note": "fixed seeds, the same every iteration and for every item (the "
            "published loop draws 5 seeds at random each iteration)",
            "iterations": iterations,
        },
    )


def _classify_across_ranks(
    items: list[LoopItem],
    images: dict[str, list[Image.Image]],
    classifier: Classifier,
    ranks: Ranks,
) -> dict[str, torch.Tensor]:
    """Every item's (N, J) label probabilities over all ranks' images (a rank may have none)."""
    mine = {
        item.prompt: (
            classifier(images[item.prompt], item.labels).double().cpu()
            if images[item.prompt]
            else torch.zeros(0, len(item.labels), dtype=torch.float64)
        )
        for item in items
    }
    parts = ranks.gather(mine)
    return {item.prompt: torch.cat([part[item.prompt] for part in parts]) for item in items}


def _solve_on_rank_0(
    weights: dict[str, torch.Tensor], stats: EditStats, scales: Scales, ranks: Ranks
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, dict[str, float]]]:
    """``solve_edit`` on rank 0; the other ranks receive its result (CPU tensors travel)."""
    if not ranks.distributed:
        return solve_edit(weights, stats, scales)
    solved = None
    if ranks.main:
        new, k, metrics = solve_edit(weights, stats, scales)
        solved = ({n: w.cpu() for n, w in new.items()}, None if k is None else k.cpu(), metrics)
    new, k, metrics = ranks.broadcast(solved)
    return {n: w.to(weights[n].device) for n, w in new.items()}, k, metrics


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    """Seconds to 4 decimals (the rest is exact)."""
    record["seconds"] = {k: round(v, 4) for k, v in record["seconds"].items()}
    return record
