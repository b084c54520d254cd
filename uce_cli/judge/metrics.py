"""The paper's figures as formulas (docs/metrics.md, "The paper's figures"): attribute deviation Δ,
the erased/others split of ImageNet top-1, the NudeNet reduction, and the Δ job over images.

The formulas are plain functions of counts and shares so a reader can check them by hand; the one
job here (``attribute_deviation_metric``) classifies images with the debias loop's own judge
(``judge/classify.py``: same classifier, same labels, same tie rule)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from uce_cli.errors import DataError
from uce_cli.judge.prompts import norm


def attribute_deviation(ratios: Sequence[float], desired: Sequence[float]) -> float:
    """Δ of one concept: mean over attributes j of |desired_j − ratio_j| / desired_j.

    With two attributes at 50/50 and no ties this is the paper's |p_desired − p_actual| / p_desired
    for either attribute (Table 3); attributes with desired 0 are left out (Δ divides by it).
    """
    terms = [abs(d - r) / d for r, d in zip(ratios, desired, strict=True) if d > 0]
    if not terms:
        raise DataError("attribute_deviation: every desired ratio is 0 — nothing to measure")
    return sum(terms) / len(terms)


def mean(values: Iterable[float]) -> float | None:
    """Plain mean; None for no values."""
    values = list(values)
    return sum(values) / len(values) if values else None


def split_top1(hits: Sequence[tuple[str, bool]], erased: set[str]) -> dict[str, float | None]:
    """Table 2's two columns from (concept, top-1 right) per image.

    ``erased`` holds normalised concept names. Each column is the mean over its classes of the
    per-class accuracy (the paper's average row); with the same image count per class this equals
    the share over images. A column with no classes is None.
    """
    per_class: dict[str, list[bool]] = {}
    for concept, hit in hits:
        per_class.setdefault(norm(concept), []).append(hit)
    accuracy = {c: sum(v) / len(v) for c, v in per_class.items()}
    return {
        "erased": mean(a for c, a in accuracy.items() if c in erased),
        "others": mean(a for c, a in accuracy.items() if c not in erased),
    }


def reduction(edited: float, base: float) -> float | None:
    """1 − edited / base (Fig. 7's reduction of exposed detections); None when base is 0."""
    return None if base == 0 else 1 - edited / base


def class_reductions(classes: dict[str, dict[str, int]]) -> dict[str, float | None]:
    """Per NudeNet class: 1 − edited count / base count (``classes`` = role → class → count)."""
    names = sorted(set(classes.get("base", {})) | set(classes.get("edited", {})))
    return {
        n: reduction(classes.get("edited", {}).get(n, 0), classes.get("base", {}).get(n, 0))
        for n in names
    }


def debias_labels(plan: Any) -> dict[str, tuple[list[str], list[str], list[float]]]:
    """norm(concept) → (attributes, labels, desired) of every debiased concept of a plan.

    The labels are the ones the debias loop classifies the bare concept's images against: its
    pair's attribute prompts (``doctor`` → ``male``, ``female``); a concept whose templates leave
    out the bare form takes its first pair's. The desired shares are the recipe's (uniform for a
    plain attribute list).
    """
    recipe = getattr(plan, "recipe", None)
    groups = (recipe.get("debias") if isinstance(recipe, dict) else None) or []
    out: dict[str, tuple[list[str], list[str], list[float]]] = {}
    for pair in plan.pairs:
        if not pair.section.startswith("debias"):
            continue
        key = norm(pair.concept)
        desired = list(pair.desired)  # set for `alphas: auto`; else the recipe's attributes
        index = pair.section.split(".")[-1]
        if not desired and index.isdigit() and int(index) < len(groups):
            given = groups[int(index)].get("attributes") or []
            desired = (
                [float(v) for v in given.values()]
                if isinstance(given, dict)
                else [1.0 / len(given)] * len(given)
            )
        if key not in out or pair.source == pair.concept:
            out[key] = (list(pair.attributes), [t for t, _ in pair.targets[1:]], desired)
    return out


def attribute_deviation_metric(
    pairs: Sequence[Any],
    plan: Any,
    model_id: str,
    device: Any,
    classifier: Any = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """attribute_deviation(_base): classify every image of a debiased concept with the debias
    loop's CLIP judge; per concept the label shares (ties count for each), then Δ; the figure is
    the mean over concepts (the "WinoBias average" row). Per-concept values in ``concepts``.

    Raises:
        DataError: no image of the prompt set phrases a debiased concept of the edit.
    """
    import torch
    from PIL import Image

    from uce_cli.judge.classify import ClipClassifier, label_ratios

    def _open(paths: list[Any]) -> list[Any]:
        images = []
        for path in paths:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        return images

    labels = debias_labels(plan)
    by_concept: dict[str, list[Any]] = {}
    for pair in pairs:
        if norm(pair.concept) in labels:
            by_concept.setdefault(norm(pair.concept), []).append(pair)
    if not by_concept:
        raise DataError(
            "attribute_deviation: no image prompt names a debiased concept of this edit — give "
            "evaluate.images a prompt set whose concept_column names the debiased concepts"
        )
    judge = classifier or ClipClassifier(
        model_id, device, allow_pickle=allow_pickle, field="evaluate.clip_model"
    )
    concepts: dict[str, dict[str, Any]] = {}
    for key, group in by_concept.items():
        attributes, names, desired = labels[key]
        record: dict[str, Any] = {"images": len(group), "attributes": attributes, "labels": names}
        for role in ("edited", "base"):
            probs = torch.cat(
                [
                    judge(_open([getattr(p, role) for p in group[s : s + 16]]), names)
                    for s in range(0, len(group), 16)
                ]
            )
            ratios = [float(r) for r in label_ratios(probs)]
            suffix = "" if role == "edited" else "_base"
            record[f"ratios{suffix}"] = dict(zip(attributes, ratios, strict=True))
            record[f"attribute_deviation{suffix}"] = attribute_deviation(ratios, desired)
        record["desired"] = dict(zip(attributes, desired, strict=True))
        concepts[group[0].concept] = record
    figures = {
        name: mean(c[name] for c in concepts.values())
        for name in ("attribute_deviation", "attribute_deviation_base")
    }
    return {
        "figures": figures,
        "model": model_id,
        "concepts": concepts,
        "settings": {
            "classifier": "judge/classify.py ClipClassifier (the debias loop's judge)",
            "labels": "the debias pair's attribute prompts; ties count for each label",
            "delta": "mean over attributes of |desired − ratio| / desired; mean over concepts",
            "concepts": len(concepts),
        },
    }
