"""Evaluation prompt sets: rows of a prompt CSV (upstream by logical name, or a local file),
filtered and grouped by the concept each row phrases (pure Python, no torch)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from uce_cli.edit.evalspec import PromptSet
from uce_cli.edit.upstream import UPSTREAM_PREFIX, upstream_file
from uce_cli.errors import DataError

# Held-out phrasings used when a recipe names none: templates no published edit uses.
DEFAULT_HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a detailed picture of {}",
    "{} in a museum catalogue",
    "an illustration showing {}, high quality",
)


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of an evaluation set and the concept it phrases ("" when unknown)."""

    prompt: str
    concept: str
    row: dict[str, str]


def norm(text: str) -> str:
    """Concept names compare case- and space-insensitively."""
    return re.sub(r"\s+", " ", text.strip()).casefold()


def prompt_set_path(spec: PromptSet, base_dir: Path) -> Path:
    """Where a prompt set's CSV is: an upstream file (fetched, checksummed) or a local path."""
    if spec.file.startswith(UPSTREAM_PREFIX):
        return upstream_file(spec.file[len(UPSTREAM_PREFIX) :])
    return (base_dir / spec.file).expanduser()


def read_prompt_set(spec: PromptSet, base_dir: Path, where: str) -> list[EvalPrompt]:
    """Rows of a prompt set, filtered by ``where`` and limited per concept.

    Args:
        spec: the set as the recipe gives it.
        base_dir: the recipe's folder (local paths are relative to it).
        where: the recipe field, for error messages (e.g. ``evaluate.heldout.0``).

    Raises:
        DataError: the file is missing or unreadable, or lacks a named column.
    """
    path = prompt_set_path(spec, base_dir)
    if not path.is_file():
        raise DataError(f"{where}.file: {path} does not exist — paths are relative to the recipe")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c for c in (reader.fieldnames or []) if c]
            named = [spec.column, spec.concept_column, *spec.where]
            missing = [c for c in named if c is not None and c not in columns]
            if missing:
                raise DataError(
                    f"{where}: {path.name} has no column {', '.join(repr(c) for c in missing)} "
                    f"— its columns: {', '.join(columns)}"
                )
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: {path} is not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{where}: {path} is not a readable CSV file ({exc})") from None
    wanted = {k: v.casefold() for k, v in spec.where.items()}
    out: list[EvalPrompt] = []
    per_concept: dict[str, int] = {}
    for row in rows:
        if any(v not in (row.get(k) or "").casefold() for k, v in wanted.items()):
            continue
        prompt = (row.get(spec.column) or "").strip()
        if not prompt:
            continue
        concept = (
            (row.get(spec.concept_column) or "").strip()
            if spec.concept_column
            else (spec.concept or "")
        )
        key = norm(concept)
        if spec.limit is not None and per_concept.get(key, 0) >= spec.limit:
            continue
        per_concept[key] = per_concept.get(key, 0) + 1
        out.append(EvalPrompt(prompt, concept, row))
    return out
