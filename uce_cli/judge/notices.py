"""The notes that head an eval report: what makes its figures say less than they seem to — random
weights in the model or a judge, metrics skipped, an ``evaluate:`` changed since the edit."""

from __future__ import annotations

from typing import Any

from uce_cli.judge.run import Run

# No released text-to-image model has a text embedding narrower than 768 (uce's tiny ones: 32).
TINY_TEXT_WIDTH = 256


def _widths(log: dict[str, Any]) -> list[int]:
    width = (log.get("solver") or {}).get("width")
    values = width.values() if isinstance(width, dict) else [width]
    return [w for w in values if isinstance(w, int) and not isinstance(w, bool)]


def report_notices(run: Run, images: dict[str, Any] | None) -> list[str]:
    """One sentence per caveat, in the order a reader needs them (eval.json ``notices``)."""
    notes: list[str] = []
    widths = _widths(run.log)
    if run.base_spec.startswith("builtin:"):
        notes.append(
            f"The model `{run.base_spec}` is one of uce's tiny models with random weights: these "
            "figures check the pipeline; they say nothing about an edit of a real model."
        )
    elif widths and max(widths) < TINY_TEXT_WIDTH:
        notes.append(
            f"The model `{run.base_spec}` has a {max(widths)}-wide text embedding, as uce's tiny "
            "test models with random weights do: these figures check the pipeline; they say "
            "nothing about an edit of a real model."
        )
    loop = (run.log.get("recipe") or {}).get("debias_loop")
    judge = loop.get("classifier") if isinstance(loop, dict) else None
    if isinstance(judge, str) and judge.startswith("builtin:"):
        notes.append(
            f"The edit's α were found by `{judge}`, a CLIP judge with random weights: its "
            "debiasing ratios are noise."
        )
    if images:
        measured = images.get("metrics") or {}
        for name, field, model in (
            ("clip", "evaluate.clip_model", run.evaluate.clip_model),
            ("imagenet_top1", "evaluate.imagenet_model", run.evaluate.imagenet_model),
        ):
            if name in measured and model.startswith("builtin:"):
                notes.append(
                    f"The judge `{model}` ({field}) has random weights: its figures are noise."
                )
        for metric, why in (images.get("skipped") or {}).items():
            notes.append(f"Metric `{metric}` was skipped: {why}.")
    p = run.provenance
    if p.get("evaluate_from") == "recipe file" and p.get("evaluate_sha256") != p.get(
        "logged_evaluate_sha256"
    ):
        notes.append(
            "evaluate: was read from the recipe file, which changed it since `uce apply` "
            f"(sha256 {str(p.get('evaluate_sha256'))[:12]}; the edit log's "
            f"{str(p.get('logged_evaluate_sha256'))[:12]})."
        )
    now = p.get("recipe_file_sha256_now")
    if now is not None and now != run.log.get("recipe_sha256"):
        notes.append(
            f"The recipe file now describes another edit (sha256 {now[:12]}, the run's "
            f"{str(run.log.get('recipe_sha256'))[:12]}): evaluate: as recorded in the edit log "
            "was used."
        )
    return notes
