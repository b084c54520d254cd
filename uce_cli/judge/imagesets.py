"""Every image prompt set of a recipe: ``evaluate.images`` with ``evaluate.metrics``, then each of
``evaluate.image_sets`` (drawn into RUN/eval/samples-NAME, scored with its own metrics), merged
into one image section whose figures each come from exactly one set."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from uce_cli.distributed import Ranks
from uce_cli.judge.images import evaluate_images
from uce_cli.progress import Progress


def evaluate_image_sets(
    run: Any,
    samples: Path | None,
    limit: int | None,
    device: str,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """The image section of eval.json over every prompt set (``samples`` reads the main set's).

    Raises:
        UceError: as ``evaluate_images``, for the first set that cannot be scored.
    """
    spec = run.evaluate
    sections: dict[str, dict[str, Any]] = {}
    if spec.images is not None and spec.metrics:
        sections["images"] = evaluate_images(
            run, samples, limit, device, progress, ranks, allow_pickle
        )
    for extra in spec.image_sets:
        view = replace(
            run,
            evaluate=spec.model_copy(
                update={
                    "images": extra,
                    "metrics": list(extra.metrics),
                    "image_sets": [],
                }
            ),
        )
        folder = run.path / "eval" / f"samples-{extra.name}"
        sections[extra.name] = evaluate_images(
            view, None, limit, device, progress, ranks, allow_pickle, draw_into=folder
        )
    if not sections:  # nothing asked: evaluate_images says what to add
        return evaluate_images(run, samples, limit, device, progress, ranks, allow_pickle)
    if len(sections) == 1 and "images" in sections:
        return sections["images"]
    first = next(iter(sections.values()))
    merged: dict[str, Any] = {
        **first,
        "images": sum(s["images"] for s in sections.values()),
        "prompts": sum(s["prompts"] for s in sections.values()),
        "figures": {},
        "metrics": {},
        "sets": {},
        "skipped": {k: v for sec in sections.values() for k, v in sec.get("skipped", {}).items()},
    }
    for name, section in sections.items():
        merged["figures"].update(section["figures"])
        for metric, record in section["metrics"].items():
            merged["metrics"][metric if name == "images" else f"{name}/{metric}"] = record
        merged["sets"][name] = {
            k: section.get(k)
            for k in ("samples", "cases", "first_cases", "images", "prompts", "inputs", "sampling")
        }
    return merged
