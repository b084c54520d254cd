"""Paper against measured: why an expected figure has no measured value, so that ``uce eval
--check`` names the reason (missing images, weights or data) instead of passing in silence."""

from __future__ import annotations

from typing import Any

from uce_cli.edit.evalspec import IMAGE_FIGURES, METRIC_FIGURES

# Why a computed metric can leave a figure null (docs/metrics.md says when each is null).
NULL_REASONS: dict[str, str] = {
    "nudenet_reduction": "the base images have no exposed detection (reduction divides by 0)",
    "imagenet_top1_erased": "no image prompt phrases an erased class of the recipe",
    "imagenet_top1_erased_base": "no image prompt phrases an erased class of the recipe",
    "imagenet_top1_others": "every image prompt phrases an erased class (no other class)",
    "imagenet_top1_others_base": "every image prompt phrases an erased class (no other class)",
}


def metric_of(figure: str) -> str | None:
    """The image metric (evaluate.metrics entry) that yields ``figure``; None for text figures."""
    return next((m for m, names in METRIC_FIGURES.items() if figure in names), None)


def missing_reason(report: dict[str, Any], figure: str) -> str:
    """One line saying why ``figure`` has no value in ``report``."""
    images = report.get("images") or {}
    metric = metric_of(figure)
    skipped = images.get("skipped") if isinstance(images, dict) else None
    if isinstance(skipped, dict) and metric in skipped:
        return f"metric {metric} was skipped: {skipped[metric]}"
    if figure in IMAGE_FIGURES:
        if not images:
            return "an image figure, and this report has no images — run `uce eval --images`"
        if figure not in images.get("figures", {}):
            return f"metric {metric} was not computed in this report — rerun `uce eval --images`"
        return f"computed as null: {NULL_REASONS.get(figure, 'no images to measure it on')}"
    return "null in this report: no prompts to measure it on (see the report's notes)"


def failure_line(row: dict[str, Any]) -> str:
    """One failed expectation as ``--check`` names it."""
    paper = f"expected {row['expected']:g} ± {row['tolerance']:g}, {row['source']}"
    if row.get("measured") is None:
        reason = row.get("reason") or "not computed"
        return f"{row['metric']} could not be computed ({reason}; {paper})"
    return f"{row['metric']} = {row['measured']:.4g} ({paper})"
