"""``uce eval`` as a library call: open a run, build its evaluation prompt sets, compute the
text-side (and, on request, image-level) figures, write ``eval/`` and check ``expect:``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from uce_cli.artifacts.editlog import package_versions
from uce_cli.edit.evalspec import FIGURES, Expect
from uce_cli.edit.plan import EditPlan
from uce_cli.errors import DataError, OutputError, UceError
from uce_cli.judge.prompts import DEFAULT_HELDOUT_TEMPLATES, norm, read_prompt_set
from uce_cli.judge.run import Run, check_same_base, open_run  # noqa: F401 - open_run: API
from uce_cli.progress import NullProgress, Progress
from uce_cli.safe_files import link_refusal

EVAL_SCHEMA = 1
EVAL_DIR = "eval"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


def edited_guides(plan: EditPlan) -> dict[str, tuple[str, str]]:
    """norm(concept) → (concept, guide) for erased and moderated concepts (not debias)."""
    guides: dict[str, tuple[str, str]] = {}
    for pair in plan.pairs:
        if pair.section.startswith("debias"):
            continue
        key = norm(pair.concept)
        # The bare concept's pair carries the bare guide (last-token mode templates guides too);
        # a custom template list without the bare concept falls back to its first pair.
        if key not in guides or pair.source == pair.concept:
            guides[key] = (pair.concept, pair.targets[0][0])
    return guides


def text_inputs(run: Run) -> tuple[Any, list[str]]:
    """The held-out, preserved and unrelated prompts of a run, and notes on what was skipped.

    Raises:
        DataError: a prompt set cannot be read, or names a concept that was not edited.
    """
    from uce_cli.judge.text import DriftPrompt, HeldOutPrompt, TextInputs

    guides = edited_guides(run.plan)
    debiased = {norm(p.concept) for p in run.plan.pairs if p.section.startswith("debias")}
    edited = set(guides) | debiased
    notes: list[str] = []
    inputs = TextInputs()
    spec = run.evaluate
    for i, ps in enumerate(spec.heldout):
        where = f"evaluate.heldout.{i}"
        if ps.concept is not None and norm(ps.concept) not in guides:
            raise DataError(
                f"{where}.concept: {ps.concept!r} is not an erased or moderated concept of this "
                f"edit — name one of: {', '.join(c for c, _ in list(guides.values())[:8])}"
            )
        rows = read_prompt_set(ps, run.base_dir, where)
        kept = [r for r in rows if norm(r.concept) in guides]
        if len(kept) < len(rows):
            notes.append(f"{where}: {len(rows) - len(kept)} rows phrase concepts not edited here")
        for r in kept:
            concept, guide = guides[norm(r.concept)]
            inputs.heldout.append(HeldOutPrompt(r.prompt, concept, guide))
    if not spec.heldout:
        for concept, guide in guides.values():
            for template in DEFAULT_HELDOUT_TEMPLATES:
                inputs.heldout.append(HeldOutPrompt(template.format(concept), concept, guide))
        if guides:
            notes.append("held-out phrasings: uce's default templates (the recipe names none)")
    for name, sets, target in (
        ("preserved", spec.preserved, inputs.preserved),
        ("unrelated", spec.unrelated, inputs.unrelated),
    ):
        for i, ps in enumerate(sets):
            where = f"evaluate.{name}.{i}"
            rows = read_prompt_set(ps, run.base_dir, where)
            kept = [r for r in rows if norm(r.concept) not in edited]
            if len(kept) < len(rows):
                notes.append(f"{where}: dropped {len(rows) - len(kept)} rows of edited concepts")
            target += [DriftPrompt(r.prompt, r.concept or f"{name}.{i}") for r in kept]
    if not spec.preserved:
        inputs.preserved = [DriftPrompt(p, p) for p in run.plan.preserve if p]
        if inputs.preserved:
            notes.append(
                "drift_preserve: on the edit's own preserve prompts (no evaluate.preserved)"
            )
    return inputs, notes


def edited_weights(run: Run) -> tuple[dict, dict, str]:
    """Base and edited k/v weights of every cross-attention layer, and the edit's sha256."""
    from uce_cli.artifacts.edits import load_edit_tensors
    from uce_cli.families.model import open_model

    base = open_model(run.base_spec, run.base_revision)
    source = run.path / "edit.safetensors"
    edit = load_edit_tensors(source if source.is_file() else run.path, base)
    check_same_base(run, base, list(edit.tensors))
    old = base.read_kv()
    new = {k: edit.tensors.get(k, w) for k, w in old.items()}
    unknown = sorted(set(edit.tensors) - set(old))
    if unknown:
        raise UceError(
            f"{run.path}: the edit changes {unknown[0]}, not a cross-attention k/v weight"
        )
    # a layer that reads its group in some columns is measured on those (SDXL's add_embedding)
    part = {t.key: t.part for t in base.kv}
    return (
        {k: part[k](w) for k, w in old.items()},
        {k: part[k](w) for k, w in new.items()},
        edit.sha256,
    )


def evaluate_text(
    run: Run, device: str = "auto", batch_size: int = 32, progress: Progress | None = None
) -> dict[str, Any]:
    """The text-side section of eval.json (figures, per layer, per concept, settings)."""
    import torch

    from uce_cli.families.model import open_model, open_text_path, pick_device
    from uce_cli.judge.text import text_figures

    progress = progress or NullProgress()
    t0 = time.perf_counter()
    inputs, notes = text_inputs(run)
    progress.start("load model")
    old, new, edit_sha = edited_weights(run)
    base = open_model(run.base_spec, run.base_revision)
    text_path = open_text_path(base, pick_device(device), torch.float32)
    progress.finish()
    loaded = time.perf_counter() - t0
    group_of = {t.key: t.group for t in base.kv}
    result = text_figures(inputs, text_path, old, new, batch_size, progress, group_of)
    result["timings"] = {"read_and_load": round(loaded, 3), **result["timings"]}
    return {
        **result,
        "settings": {
            "pairing": "paper alignment (source's last word token onwards ↔ guide's)",
            "positions": text_path.max_tokens,
            "encoder_dtype": "float32",
            "layer_average": "mean over layers; concepts weigh equally",
            "edit_sha256": edit_sha,
        },
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def flat_figures(report: dict[str, Any]) -> dict[str, float | None]:
    """Every figure of a report by its name in evalspec.FIGURES."""
    figures: dict[str, float | None] = {}
    for section in ("text", "images", "attack"):
        part = report.get(section) or {}
        figures.update(part.get("figures", {}))
    return {k: v for k, v in figures.items() if k in FIGURES}


def check_expectations(report: dict[str, Any], expect: list[Expect]) -> list[dict[str, Any]]:
    """Compare measured figures with ``expect:``; one row per expectation with ``ok``."""
    from uce_cli.judge.expectations import missing_reason

    figures = flat_figures(report)
    return [
        expectation_row(item, figures.get(item.metric), lambda m: missing_reason(report, m))
        for item in expect
    ]


def expectation_row(
    item: Expect, measured: float | None, reason: Callable[[str], str | None] | None = None
) -> dict[str, Any]:
    """One checked ``expect:`` entry: within tolerance (``ok``), and why a figure is missing."""
    ok = measured is not None and abs(measured - item.value) <= item.tolerance
    return {
        "metric": item.metric,
        "expected": item.value,
        "tolerance": item.tolerance,
        "measured": measured,
        "source": item.source,
        "ok": ok,
        "reason": None if measured is not None or reason is None else reason(item.metric),
    }


def build_report(run: Run, text: dict[str, Any] | None, images: dict[str, Any] | None) -> dict:
    """The eval.json payload."""
    report = {
        "schema": EVAL_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "run": str(run.path),
        "recipe_file": run.log.get("recipe_file"),
        "recipe_sha256": run.log.get("recipe_sha256"),
        **run.provenance,  # which evaluate: judged the edit (judge/run.py)
        "base_model": run.base_spec,
        "text": text,
        "images": images,
    }
    with_attack(report, run.path)
    report["figures"] = flat_figures(report)
    report["expect"] = check_expectations(report, run.evaluate.expect)
    from uce_cli.judge.notices import report_notices

    report["notices"] = report_notices(run, images)
    return report


def check_eval_folder(run_path: Path) -> Path:
    """RUN/eval, refused when something other than uce's folder and report file is there.

    Raises:
        OutputError: eval/ is a file or a symlink, or eval/eval.json is not a regular file.
    """
    folder = Path(run_path) / EVAL_DIR
    if folder.is_symlink():
        raise OutputError(link_refusal(folder, "folder"))
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: not a folder where uce keeps its eval report — move it away")
    report = folder / EVAL_JSON
    if report.is_symlink():
        raise OutputError(link_refusal(report))
    if report.exists() and not report.is_file():
        raise OutputError(
            f"{report}: not a regular file where uce writes its eval report — move it away"
        )
    return folder


def with_attack(report: dict[str, Any], run_path: Path) -> dict[str, Any]:
    """Put the figures of RUN/attack/attack.json (``uce attack``) into ``report["attack"]``, so
    ``expect:`` can name them; leaves the report as is when the run has not been attacked."""
    from uce_cli.judge.attack_report import read_attack_figures

    figures = read_attack_figures(run_path)
    if figures:
        report["attack"] = {"figures": figures}
    return report


def read_report(run_path: Path) -> dict[str, Any] | None:
    """A run's eval.json (checked by the validating reader), or None when it has none.

    Raises:
        UceError: eval/ or eval.json is not of the kind uce writes, or the file is not a uce
            eval report of this schema (one line naming the file and field).
    """
    from uce_cli.artifacts.records import read_eval_record

    path = check_eval_folder(run_path) / EVAL_JSON
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        return read_eval_record(path)
    except DataError as exc:
        raise UceError(f"{exc} — rerun `uce eval --force` to replace it") from None


def write_report(run: Run, report: dict[str, Any], force: bool) -> Path:
    """Write eval/eval.json and eval/eval.md (atomically each); refuse to replace without force."""
    from uce_cli.judge.report import render_markdown
    from uce_cli.safe_files import create_dir, write_file

    folder = run.path / EVAL_DIR
    if (folder / EVAL_JSON).exists() and not force:
        raise OutputError(
            f"{folder / EVAL_JSON} exists — pass --force to recompute it, or --check alone to "
            "check it"
        )
    create_dir(folder, run.path)  # never through a link planted in the run (safe_files)
    write_file(folder / EVAL_JSON, json.dumps(report, indent=2) + "\n", run.path)
    write_file(folder / EVAL_MD, render_markdown(report), run.path)
    return folder
