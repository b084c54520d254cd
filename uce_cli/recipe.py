"""The recipe: pydantic models of the YAML file and ``load_recipe``, which reports every problem at once.

This module imports no torch: ``uce validate`` must stay fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from uce_cli.errors import RecipeError
from uce_cli.evalspec import Evaluate

Alignment = Literal["paper", "last-token"]
TemplateSet = Literal["art", "object", "none"]
Projection = Literal["to_k", "to_v"]
OutputFormat = Literal["diffusers", "delta", "lora", "lora-kohya", "single-file", "operator"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)

NonEmptyStr = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ConceptSource(_Strict):
    """Concepts inline (``concepts``) or from a file (``concepts_file`` + ``column`` for csv)."""

    concepts: list[str] | None = Field(
        default=None, description="the concepts, e.g. [Kelly Mckernan, Thomas Kinkade]"
    )
    concepts_file: str | None = Field(
        default=None,
        description="txt (one concept per line) or csv (with `column`), relative to the recipe; "
        "`upstream:NAME` names an upstream UCE data file",
    )
    column: str | None = Field(default=None, description="csv column holding the concepts")
    templates: TemplateSet | list[str] = Field(
        default="none", description="art | object | none | a list of templates with {}"
    )

    @field_validator("concepts")
    @classmethod
    def _concepts_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("empty concept list — list at least one concept or remove the group")
        for i, concept in enumerate(value):
            if not concept.strip():
                raise ValueError(f"concept #{i} is empty — remove it")
        return value

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("empty template list — use `none` for the bare concept")
            for template in value:
                if template.count("{}") != 1:
                    raise ValueError(
                        f"template {template!r} must contain exactly one {{}} "
                        "where the concept goes"
                    )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ConceptSource:
        if (self.concepts is None) == (self.concepts_file is None):
            raise ValueError(
                "give either `concepts` (a list) or `concepts_file`, not both or neither"
            )
        if self.column is not None and self.concepts_file is None:
            raise ValueError("`column` only applies with `concepts_file`")
        return self


class EraseGroup(ConceptSource):
    """Concepts whose outputs move to a guide concept's (paper §4.1)."""

    guide: str | list[str] | None = Field(
        default=None,
        description='guide concept(s): one for all, or one per concept; default "art" with '
        'art templates, else "" (the unconditional prompt)',
    )


class ModerateGroup(ConceptSource):
    """Concepts erased towards the unconditional prompt "" (paper §4.2)."""


class DebiasGroup(ConceptSource):
    """Concepts whose outputs are spread over attributes, Eq. 9: v* = W_old (c + sum_a alpha_a c_a)."""

    attributes: dict[NonEmptyStr, float] | list[NonEmptyStr] = Field(
        description="attributes (with desired ratios), e.g. {male: 0.5, female: 0.5}"
    )
    alphas: dict[NonEmptyStr, float] | Literal["auto"] = Field(
        description="alpha per attribute (explicit numbers); `auto` needs the debias loop"
    )

    @field_validator("attributes")
    @classmethod
    def _attributes_not_empty(
        cls, value: dict[str, float] | list[str]
    ) -> dict[str, float] | list[str]:
        if not value:
            raise ValueError("no attributes — list at least one, e.g. {male: 0.5, female: 0.5}")
        if isinstance(value, dict) and any(v < 0 for v in value.values()):
            raise ValueError("attribute ratios must be >= 0")
        return value

    @model_validator(mode="after")
    def _alphas_match(self) -> DebiasGroup:
        if isinstance(self.alphas, dict):
            names = list(self.attributes)
            if set(self.alphas) != set(names):
                raise ValueError(
                    f"alphas name {sorted(self.alphas)} but attributes are {sorted(names)} "
                    "— give one alpha per attribute"
                )
        return self


class PreserveGroup(ConceptSource):
    """Concepts whose outputs must not move."""

    exclude_edited: bool = Field(
        default=False,
        description="drop concepts that are also edited (e.g. preserve a full artist list but the "
        "erased ones) instead of refusing the recipe",
    )


class Solver(_Strict):
    """Scales of the closed form (DESIGN §1); None means the alignment mode's default."""

    lam: float | None = Field(default=None, alias="lambda", ge=0, description="ridge term λ")
    erase_scale: float | None = Field(default=None, ge=0, description="s_e")
    preserve_scale: float | Literal["auto"] | None = Field(
        default=None, description="s_p; auto = max(0.1, 1/(1+|P|))"
    )

    @field_validator("preserve_scale")
    @classmethod
    def _preserve_non_negative(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and value < 0:
            raise ValueError("must be >= 0 (or `auto`)")
        return value


class Layers(_Strict):
    """Which projections of every cross-attention block are edited."""

    projections: list[Projection] = Field(default_factory=lambda: ["to_k", "to_v"], min_length=1)


class Output(_Strict):
    """Where and in which formats the edit is written."""

    dir: str | None = Field(default=None, description="output folder, relative to the recipe")
    formats: list[OutputFormat] = Field(
        default_factory=lambda: ["diffusers", "delta"], min_length=1
    )


class Recipe(_Strict):
    """A whole UCE edit, as written in a recipe file."""

    model: NonEmptyStr = Field(description="hub id, local diffusers folder, or builtin:tiny-sd")
    revision: str | None = Field(default=None, description="hub revision (branch, tag, commit)")
    alignment: Alignment = "paper"
    erase: list[EraseGroup] = Field(default_factory=list)
    moderate: list[ModerateGroup] = Field(default_factory=list)
    debias: list[DebiasGroup] = Field(default_factory=list)
    preserve: list[PreserveGroup] = Field(default_factory=list)
    solver: Solver = Field(default_factory=Solver)
    layers: Layers = Field(default_factory=Layers)
    output: Output = Field(default_factory=Output)
    seed: int = 0
    evaluate: Evaluate | None = Field(
        default=None, description="how `uce eval` judges the edit (prompt sets, metrics, expect)"
    )

    @model_validator(mode="after")
    def _has_edit(self) -> Recipe:
        if not (self.erase or self.moderate or self.debias):
            raise ValueError(
                "no edit section — add at least one of `erase`, `moderate` or `debias`"
            )
        return self


def recipe_sha256(recipe: Recipe) -> str:
    """Hash of the normalized recipe (aliases, sorted keys), stable across formatting changes.

    ``evaluate:`` is left out: it says how an edit is judged, not what the edit is.
    """
    dumped = recipe.model_dump(mode="json", by_alias=True, exclude={"evaluate"})
    payload = json.dumps(dumped, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """Walk the schema along an error location to the pydantic model that holds its last key."""
    current: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    """list[X] / X | None → X, when X is a pydantic model."""
    origin = get_origin(annotation)
    if origin is None:
        return annotation
    for arg in get_args(annotation):
        inner = _unwrap_model(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return None if origin not in (list, Union) else annotation


def _hint(error: dict[str, Any]) -> str:
    loc = error["loc"]
    if error["type"] == "extra_forbidden" and loc:
        model = _model_at(tuple(loc))
        if model is not None:
            allowed = _field_names(model)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            if close:
                return f"did you mean `{close[0]}`? allowed keys: {', '.join(allowed)}"
            return f"allowed keys: {', '.join(allowed)}"
    if error["type"] == "missing" and loc:
        model = _model_at(tuple(loc))
        field = model.model_fields.get(str(loc[-1])) if model else None
        if field is not None and field.description:
            return f"add it: {field.description}"
    return ""


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('erase', 0, 'guide') → 'erase.0.guide'."""
    return ".".join(str(part) for part in loc) if loc else "(top level)"


def _is_union_tag(part: str | int) -> bool:
    # pydantic names union branches by their type, e.g. 'str', 'list[str]', "literal['auto']".
    return isinstance(part, str) and (
        "[" in part or part in ("str", "float", "int", "bool", "constrained-str")
    )


def _problems_from(error: ValidationError, label: str) -> list[str]:
    """One line per problem; the branches of a union collapse into a single message."""
    merged: dict[tuple, list[dict[str, Any]]] = {}
    for item in error.errors():
        loc = tuple(item["loc"])
        tag_at = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
        key = loc if tag_at is None else loc[:tag_at]
        merged.setdefault(key, []).append(
            {**item, "deep": tag_at is not None and tag_at < len(loc) - 1}
        )
    problems: list[str] = []
    for key, items in merged.items():
        deep = [i for i in items if i["deep"]]
        if deep:
            # The value matched one branch's outer type: report that branch's inner errors only.
            for item in deep:
                loc = tuple(p for p in item["loc"] if not _is_union_tag(p))
                problems.append(_line(label, loc, item))
        elif len(items) > 1:
            wants = " or ".join(i["msg"].removeprefix("Input should be ") for i in items)
            problems.append(
                f"{label}: {format_loc(key)}: Input should be {wants} (got {items[0]['input']!r})"
            )
        else:
            problems.append(_line(label, key, items[0]))
    return list(dict.fromkeys(problems))


def _line(label: str, loc: tuple[str | int, ...], item: dict[str, Any]) -> str:
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] in (
        "literal_error",
        "string_type",
        "float_parsing",
        "int_parsing",
        "list_type",
        "dict_type",
        "bool_parsing",
    ):
        message += f" (got {item['input']!r})"
    hint = _hint({**item, "loc": loc})
    return f"{label}: {format_loc(loc)}: {message}" + (f" — {hint}" if hint else "")


def parse_recipe(data: Any, label: str) -> Recipe:
    """Validate already-parsed YAML data into a Recipe, raising RecipeError with every problem."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            [
                f"{label}: the recipe is {kind}, not a mapping — start with `model:` and an edit section"
            ]
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_problems_from(exc, label)) from None


def read_recipe_data(path: Path) -> Any:
    """Read and YAML-parse a recipe file (``yaml.safe_load`` only), with file-level errors."""
    label = str(path)
    if not path.exists():
        raise RecipeError([f"{label}: no such file — check the path"])
    if path.is_dir():
        raise RecipeError([f"{label}: is a folder, not a recipe file"])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError([f"{label}: not a UTF-8 text file — a recipe is YAML text"]) from None
    except OSError as exc:
        raise RecipeError([f"{label}: cannot read ({exc.strerror})"]) from None
    if "\x00" in text:
        raise RecipeError([f"{label}: not a text file — a recipe is YAML text"])
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{label}: {where}YAML syntax error: {problem}"]) from None


def load_recipe(path: Path) -> Recipe:
    """Read, parse and validate a recipe file.

    Raises:
        RecipeError: listing every problem as ``file: field.path: message — hint``.
    """
    return parse_recipe(read_recipe_data(path), str(path))
