"""The one reader of the JSON records uce finds in folders it is given (edit logs, eval reports,
sample manifests): each is checked against a pydantic model of its shape before anyone reads it.

A run folder is input: anyone who can write into it can put any bytes in its JSON files. Every
such file is read here — a regular file of bounded size, UTF-8 JSON of bounded depth, then a
model that is strict about the types of the fields uce reads (a figure is a number, a path is a
string, a map is a map) and lets other fields be — and any problem becomes one ``DataError``
naming the file and the field. Callers get the checked JSON as a plain dict.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from uce_cli.errors import DataError

# A record larger than this is not one uce wrote (a 1,000-iteration debias log is a few MB).
MAX_RECORD_BYTES = 64 * 2**20


class _Record(BaseModel):
    """Strict types for the fields named; other fields are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------
# edit_log.json (uce apply, merge, transfer)


class LayerRecord(_Record):
    """Per-layer figures of an edit log (merge/transfer logs lack the residuals)."""

    shape: list[int] = Field(default_factory=list)
    rel_delta: float | None = None
    residual_before: float | None = None
    residual_after: float | None = None
    preserve_drift: float | None = None


class BaseModelRecord(_Record):
    """The base model an edit was made for."""

    spec: str | None = None
    revision: str | None = None
    path: str | None = None
    family: str | None = None
    kv_weights_sha256: str | None = None
    text_encoder_weights_sha256: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


class LoopItemRecord(_Record):
    """One item of a debias-loop iteration."""

    prompt: str
    ratios: dict[str, float] = Field(default_factory=dict)
    desired: dict[str, float] = Field(default_factory=dict)
    gap: float | None = None
    alpha: dict[str, float] = Field(default_factory=dict)
    converged: bool = False


class IterationRecord(_Record):
    """One iteration of the debias loop."""

    iteration: int
    images_sampled: int | None = None
    sampled: list[str] = Field(default_factory=list)
    items: list[LoopItemRecord] = Field(default_factory=list)
    converged: list[str] = Field(default_factory=list)
    seconds: dict[str, float] = Field(default_factory=dict)


class DebiasRecord(_Record):
    """The debias loop (Algorithm 1) of an ``alphas: auto`` edit."""

    stopped: str | None = None
    iterations: list[IterationRecord] = Field(default_factory=list)


class EditLogRecord(_Record):
    """edit_log.json: the fields uce reads back (show, eval, sample --edit)."""

    schema_: int = Field(alias="schema")
    layers: dict[str, LayerRecord]
    recipe: dict[str, Any] | None = None
    recipe_file: str | None = None
    recipe_sha256: str | None = None
    paths: dict[str, str] = Field(default_factory=dict)
    base_model: BaseModelRecord | None = None
    plan: dict[str, Any] = Field(default_factory=dict)
    solver: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    debias: DebiasRecord | None = None


# ---------------------------------------------------------------------------------------------
# eval/eval.json (uce eval). Which figures exist is open (new metrics add names); their shape is
# not: a figure is a number or null.


class ExpectRecord(_Record):
    """One ``expect:`` row of a report."""

    metric: str
    expected: float
    tolerance: float
    measured: float | None = None
    source: str
    ok: bool


class SectionRecord(_Record):
    """The text or image section of a report: its figures at least."""

    figures: dict[str, float | None] = Field(default_factory=dict)


class EvalRecord(_Record):
    """eval.json."""

    schema_: Literal[1] = Field(alias="schema")
    run: str
    base_model: str
    recipe_file: str | None = None
    recipe_sha256: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    figures: dict[str, float | None]
    expect: list[ExpectRecord] = Field(default_factory=list)
    text: SectionRecord | None = None
    images: SectionRecord | None = None
    plots: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# manifest.json of a `uce sample` folder (and manifest.rank-N.json of a launched run)


class ImageEntryRecord(_Record):
    """One image of a sample manifest: its path in the folder and its PNG parameters."""

    path: str
    prompt: str | None = None

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or "\\" in value or not pure.parts:
            raise ValueError(f"{value!r} is not a path inside the sample folder")
        return value


class ManifestRecord(_Record):
    """manifest.json."""

    schema_: int = Field(alias="schema")
    settings: dict[str, str] = Field(default_factory=dict)
    images: list[ImageEntryRecord] = Field(default_factory=list)
    grids: list[str] = Field(default_factory=list)


R = TypeVar("R", bound=BaseModel)


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def read_json_file(path: Path, what: str) -> Any:
    """The parsed JSON of a regular, bounded, UTF-8 file.

    Raises:
        DataError: missing, not a regular file, too large, not UTF-8, not JSON, or nested too
            deeply to parse — naming the file.
    """
    path = Path(path)
    if path.is_symlink():
        raise DataError(f"{path}: a symlink where uce expects its {what} — remove it")
    if not path.exists():
        raise DataError(f"{path}: no {what} here")
    if not path.is_file():
        raise DataError(f"{path}: not a file (a folder or a device) where uce expects its {what}")
    try:
        size = path.stat().st_size
        if size > MAX_RECORD_BYTES:
            raise DataError(
                f"{path}: {size} bytes — larger than any {what} uce writes "
                f"({MAX_RECORD_BYTES // 2**20} MB at most)"
            )
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except DataError:
        raise
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a {what}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}) — not a {what}") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not a readable JSON {what} (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it as a {what} ({exc})") from None


def validate_record(data: Any, model: type[R], path: Path, what: str) -> R:
    """``data`` checked against ``model``.

    Raises:
        DataError: one line naming the file, the first field out of shape and what it should be,
            and how many more there are.
    """
    try:
        return model.model_validate(data)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a {what}") from None
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DataError(
            f"{path}: not a uce {what}: field {_location(first['loc'])}: {first['msg']}{more}"
        ) from None


def read_record(path: Path, model: type[R], what: str) -> dict[str, Any]:
    """A JSON record read and checked against ``model``; the checked JSON as a dict.

    Raises:
        DataError: the file cannot be read, or is not of the model's shape (one line).
    """
    data = read_json_file(path, what)
    validate_record(data, model, path, what)
    return data


def read_edit_log_record(path: Path) -> dict[str, Any]:
    """edit_log.json, checked."""
    return read_record(path, EditLogRecord, "edit log")


def read_eval_record(path: Path) -> dict[str, Any]:
    """eval/eval.json, checked."""
    return read_record(path, EvalRecord, "eval report (eval.json)")


def read_manifest_record(path: Path) -> dict[str, Any]:
    """A sample folder's manifest, checked."""
    return read_record(path, ManifestRecord, "sample manifest")
