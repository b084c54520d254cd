"""Prompt sets: ``--prompt`` texts or an evaluation CSV read as rows with case ids and seeds."""

from __future__ import annotations

import csv
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from uce_cli.errors import DataError

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PromptRow:
    """One prompt to sample: its text, case id (file name stem) and optional per-row seed."""

    prompt: str
    case: str
    seed: int | None = None


def prompts_from_text(texts: list[str], allow_empty: bool = False) -> list[PromptRow]:
    """``--prompt`` values as rows with case ids 0, 1, …

    Raises:
        DataError: an empty prompt (unless ``allow_empty``).
    """
    if not allow_empty:
        empty = [str(i + 1) for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise DataError(
                f"--prompt number {', '.join(empty)} is empty — give the text to sample, or pass "
                "--allow-empty-prompts to sample unconditional images"
            )
    return [PromptRow(text, str(i)) for i, text in enumerate(texts)]


def check_regular_file(path: Path, what: str, missing_hint: str, expected: str) -> None:
    """Refuse anything but an existing regular file, without opening it (a FIFO would block).

    Raises:
        DataError: ``what`` ``path`` is missing (``missing_hint``), a folder, or not a regular
            file (``expected`` says what to give instead).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist — {missing_hint}") from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise DataError(f"cannot read {what} {path} ({reason})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{what} {path} is a folder, not a regular file — name the file in it")
    if not stat.S_ISREG(mode):
        raise DataError(
            f"{what} {path} is not a regular file (a pipe, socket or device) — give {expected}"
        )


def read_prompts_csv(
    path: Path, limit: int | None = None, allow_empty: bool = False
) -> list[PromptRow]:
    """Read a prompt set in the layout of the published evaluation CSVs.

    Columns: ``prompt`` (required; quoted multi-line fields allowed), ``evaluation_seed`` and
    ``case_number`` (optional; without ``case_number`` the 0-based row index is the case id).
    Other columns are ignored. Every problem is reported at once, with its line number.

    Args:
        path: the CSV file.
        limit: read only the first ``limit`` rows.
        allow_empty: accept empty prompts (unconditional samples; I2P case 2260 is one).

    Raises:
        DataError: unreadable file, no ``prompt`` column, or bad rows.
    """
    check_regular_file(path, "prompts file", "check the path", "a csv file")
    rows: list[PromptRow] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "prompt" not in columns:
                found = ", ".join(repr(c) for c in columns) or "none"
                raise DataError(
                    f"{path}: no 'prompt' column (columns: {found}) — the first line must be a "
                    "header naming a 'prompt' column (optional: evaluation_seed, case_number)"
                )
            line = reader.line_num + 1
            for index, record in enumerate(reader):
                if limit is not None and index >= limit:
                    break
                start, line = line, reader.line_num + 1
                where = f"{path.name} line {start}"
                prompt = record.get("prompt") or ""
                if not prompt.strip() and not allow_empty:
                    problems.append(
                        f"{where}: empty prompt — fix the row, or pass --allow-empty-prompts to "
                        "sample it unconditionally"
                    )
                seed = None
                if "evaluation_seed" in columns:
                    raw = (record.get("evaluation_seed") or "").strip()
                    if not raw.isdigit() or int(raw) > MAX_SEED:
                        problems.append(
                            f"{where}: evaluation_seed {raw!r} is not a whole number in 0…{MAX_SEED}"
                        )
                    else:
                        seed = int(raw)
                case = (
                    (record.get("case_number") or "").strip()
                    if "case_number" in columns
                    else str(index)
                )
                if not case:
                    problems.append(f"{where}: empty case_number")
                stem = file_stem(case)
                if stem in seen:
                    problems.append(
                        f"{where}: case_number {case!r} repeats the row of line {seen[stem]} — "
                        "case numbers name the image files and must be unique"
                    )
                seen.setdefault(stem, start)
                rows.append(PromptRow(prompt, case, seed))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}) — save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    if problems:
        shown = problems[:10] + ([f"… and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise DataError("\n".join(shown))
    if not rows:
        raise DataError(f"{path}: no prompt rows after the header")
    return rows


def file_stem(case: str) -> str:
    """A case id as a file name stem: readable, with anything unsafe in a file name replaced.

    Args:
        case: a case id; case ids come from user files.

    Returns:
        The stem, never empty and never starting with a dot.
    """
    return re.sub(r"[^\w.-]", "_", case).lstrip(".") or "_"
