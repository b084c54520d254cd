"""The recipe: pydantic models of the YAML file and ``load_recipe``, which reports every problem at once.

This module imports no torch: ``uce validate`` must stay fast. A recipe is read with a bounded
``yaml.SafeLoader`` (no alias bombs, no duplicate keys, no tags beyond the plain ones), every number
is checked finite and in range, and every message is the project's own wording, never pydantic's.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import reprlib
import stat
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import SchemaError

from uce_cli.edit.evalspec import Evaluate
from uce_cli.errors import RecipeError, is_interrupt

Alignment = Literal["paper", "last-token"]
TemplateSet = Literal["art", "object", "none"]
# SD-style families edit attn2.to_k/to_v; FLUX/SD3 their text input projections; add_embedding is
# SDXL's pooled text path, edited only when named (docs/families.md).
Projection = Literal["context_embedder", "text_embedder", "add_embedding", "to_k", "to_v"]
AlphaScale = Literal["relative", "absolute"]
OutputFormat = Literal["diffusers", "delta", "lora", "lora-kohya", "single-file", "operator"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)

# Ranges a recipe's numbers must lie in. Beyond them an edit is meaningless or numerically unsafe:
# |alpha| of a few already moves a concept past its attributes; scales beyond 1e6 swamp the
# float64 Gram matrix (its entries are already ~1e3 for CLIP embeddings).
MAX_ALPHA = 10.0
MAX_SCALE = 1e6
MAX_SEED = 2**63 - 1  # the range torch.manual_seed and the sample command's seeds share
RATIO_TOLERANCE = 1e-6

# Bounds of the YAML reader: a recipe is a small hand-written file.
MAX_YAML_NODES = 100_000  # nodes after expanding every alias (long lists belong in concepts_file)
MAX_YAML_DEPTH = 50
MAX_NUMBER_CHARS = 100
PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")
)
MAX_PROBLEMS = 50
# Sizes bounded at the door, before any work: a recipe is a small hand-written file (the largest
# shipped one is ~3 kB); a concept is a name or short phrase (a prompt longer than the text
# encoder's 77 tokens is refused later anyway); the largest published plan (1,734 artists × 6
# prompts, plus preserve prompts) has ~12,000 prompts.
MAX_RECIPE_BYTES = 1_000_000
MAX_CONCEPT_CHARS = 1_000
MAX_CONCEPTS = 100_000  # per group, inline or from a concepts file
# Images the debias loop draws per prompt per round (len(seeds) × images_per_seed): the published
# loop draws 5 × 10 = 50; each batch's latents are drawn whole, so this bounds memory too.
MAX_LOOP_IMAGES = 1_000
MAX_LOOP_BATCH = 256
SHOWN_CHARS = 60

# NUL, other control characters (tab and line breaks excepted) and lone surrogates.
BAD_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

NonEmptyStr = Annotated[str, Field(min_length=1)]
Number = Annotated[float, Field(strict=True)]  # strict: `true` or "0.5" are not numbers


def shorten(value: Any, limit: int = SHOWN_CHARS) -> str:
    """The repr of a user-supplied value, at most ``limit`` characters, never built in full.

    A recipe value can be megabytes long (or an expanded alias): messages show a prefix only.
    """
    if isinstance(value, str):
        text = repr(value[: limit + 1])
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        text = f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    else:
        short = reprlib.Repr()
        short.maxstring = short.maxother = short.maxlong = limit
        short.maxlevel, short.maxlist, short.maxdict = 3, 5, 5
        text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show_name(name: Any, limit: int = SHOWN_CHARS) -> str:
    """A user-given name (key, concept, path) for a message: as written when printable, else its
    repr; at most ``limit`` characters."""
    if isinstance(name, str) and name.isprintable():
        return name if len(name) <= limit else name[: limit - 1] + "…"
    return shorten(name, limit)


def split_template(template: str) -> tuple[str, str]:
    """A template's text before and after its one ``{}`` slot (``{{``/``}}`` unescaped).

    Raises:
        ValueError: a message for the user when the template is not literal text around exactly
            one empty ``{}`` (no field names, format specs or conversions, no lone braces).
    """
    fix = "write {} once where the concept goes, and {{ }} for literal braces"
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template {shorten(template)} is not valid ({exc}) — {fix}") from None
    fields = [(name, spec, conv) for _, name, spec, conv in pieces if name is not None]
    if len(fields) != 1:
        raise ValueError(
            f"template {shorten(template)} must contain exactly one {{}} where the concept goes, "
            f"not {len(fields)} ({{{{}}}} is a literal brace pair, not a slot) — {fix}"
        )
    if fields[0] != ("", "", None):
        raise ValueError(
            f"template {shorten(template)} must use a plain {{}} (no name, format spec or "
            f"conversion such as {{x}}, {{:>9}} or {{!r}}) — {fix}"
        )
    before, after, slot_seen = [], [], False
    for literal, name, _, _ in pieces:
        (after if slot_seen else before).append(literal)
        slot_seen = slot_seen or name is not None
    return "".join(before), "".join(after)


def fill_template(template: str, concept: str) -> str:
    """The prompt a template makes of a concept: exactly one prompt, the concept verbatim."""
    before, after = split_template(template)
    return before + concept + after


def _check_number(value: float, low: float, high: float, hint: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, not {value} — {hint}")
    if not low <= value <= high:
        raise ValueError(f"{value:g} is outside {low:g}…{high:g} — {hint}")
    return value


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
        if len(value) > MAX_CONCEPTS:
            raise ValueError(
                f"{len(value):,} concepts, more than the {MAX_CONCEPTS:,} a group may list — split "
                "the list over several groups or recipes"
            )
        for i, concept in enumerate(value):
            if not concept.strip():
                raise ValueError(f"concept #{i} is empty — remove it")
            if len(concept) > MAX_CONCEPT_CHARS:
                raise ValueError(
                    f"concept #{i} is {len(concept):,} characters long, more than the "
                    f"{MAX_CONCEPT_CHARS:,} a concept may have — a concept is a name or short phrase"
                )
        return value

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("empty template list — use `none` for the bare concept")
            for template in value:
                split_template(template)
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
    """Concepts whose outputs are spread over attributes (paper §4.3, Eq. 9 / the published code).

    Each prompt of a concept (``image of doctor``) gets attribute prompts by replacing the concept
    (``image of male``); the target adds α-weighted attribute outputs, norm-relative
    (``alpha_scale: relative``, the published code) or as Eq. 9 (``absolute``).
    """

    attributes: dict[NonEmptyStr, Number] | list[NonEmptyStr] = Field(
        description="attributes (with desired ratios summing to 1), e.g. {male: 0.5, female: 0.5}"
    )
    alphas: dict[NonEmptyStr, Number] | Literal["auto"] = Field(
        description="alpha per attribute (explicit numbers), or `auto` (Algorithm 1: sample, "
        "classify, update, re-edit; settings in `debias_loop`)"
    )
    alpha_scale: AlphaScale | None = Field(
        default=None,
        description="relative (α times the target's norm, the published code; default in paper "
        "mode) | absolute (Eq. 9: v* = W_old (c + Σ α c_a); default in last-token mode)",
    )

    @field_validator("attributes")
    @classmethod
    def _attributes_are_ratios(
        cls, value: dict[str, float] | list[str]
    ) -> dict[str, float] | list[str]:
        if not value:
            raise ValueError("no attributes — list at least one, e.g. {male: 0.5, female: 0.5}")
        if isinstance(value, dict):
            hint = "ratios are the desired shares, e.g. {male: 0.5, female: 0.5}"
            for name, ratio in value.items():
                try:
                    _check_number(ratio, 0.0, 1.0, hint)
                except ValueError as exc:
                    raise ValueError(f"ratio of `{show_name(name)}`: {exc}") from None
            total = math.fsum(value.values())
            if abs(total - 1.0) > RATIO_TOLERANCE:
                raise ValueError(f"the desired ratios sum to {total:g}, not 1 — {hint}")
        return value

    @field_validator("alphas")
    @classmethod
    def _alphas_in_range(cls, value: dict[str, float] | str) -> dict[str, float] | str:
        if isinstance(value, dict):
            hint = f"an alpha is a weight of the attribute's direction, |alpha| <= {MAX_ALPHA:g}"
            for name, alpha in value.items():
                try:
                    _check_number(alpha, -MAX_ALPHA, MAX_ALPHA, hint)
                except ValueError as exc:
                    raise ValueError(f"alpha of `{show_name(name)}`: {exc}") from None
        return value

    @model_validator(mode="after")
    def _alphas_match(self) -> DebiasGroup:
        if isinstance(self.alphas, dict):
            names = list(self.attributes)
            if set(self.alphas) != set(names):
                raise ValueError(
                    f"alphas name {shorten(sorted(self.alphas))} but attributes are "
                    f"{shorten(sorted(names))} — give one alpha per attribute"
                )
        return self

    def desired_ratios(self) -> list[float]:
        """Desired share per attribute, in attribute order (uniform for a plain list)."""
        if isinstance(self.attributes, dict):
            return [float(v) for v in self.attributes.values()]
        return [1.0 / len(self.attributes)] * len(self.attributes)


class DebiasLoop(_Strict):
    """Settings of Algorithm 1 (``alphas: auto``); defaults are the published loop's."""

    seeds: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        min_length=1,
        description="seeds per item, fixed for every iteration (the published loop draws 5 at "
        "random each iteration)",
    )
    images_per_seed: int = Field(
        default=10, ge=1, le=100_000, description="images drawn from each seed"
    )
    steps: int = Field(default=20, ge=1, le=10_000, description="sampling steps")
    guidance: Number = Field(
        default=7.5,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description="classifier-free guidance scale",
    )
    batch_size: int = Field(
        default=10, ge=1, le=MAX_LOOP_BATCH, description="images per pipeline call"
    )
    classifier: NonEmptyStr = Field(
        default="openai/clip-vit-base-patch32",
        description="CLIP model (hub id or local folder) that labels each image zero-shot",
    )
    eta: Number = Field(
        default=0.1,
        gt=0,
        le=10,
        allow_inf_nan=False,
        description="step size: α = eta·(desired − ratio)",
    )
    tolerance: Number = Field(
        default=0.05,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="an item is done when every ratio is this close",
    )
    max_iterations: int = Field(
        default=30, ge=1, le=10_000, description="sample → edit rounds at most"
    )

    @model_validator(mode="after")
    def _images_bounded(self) -> DebiasLoop:
        images = len(self.seeds) * self.images_per_seed
        if images > MAX_LOOP_IMAGES:
            raise ValueError(
                f"{len(self.seeds)} seeds × images_per_seed {self.images_per_seed} = {images:,} "
                f"images per prompt per round, more than {MAX_LOOP_IMAGES:,} — the published "
                "loop draws 5 × 10 = 50; lower images_per_seed or use fewer seeds"
            )
        return self


SolverMethod = Literal["least-squares", "null-space"]
KeepExact = Literal["sot", "empty"]
MAX_AUTO_TOP = 100_000
DEFAULT_NULL_SPACE_THRESHOLD = 1e-3  # relative to the mean squared norm of a preserve vector
MAX_AUGMENT_COPIES = 1_000


class AugmentPreserve(_Strict):
    """Seeded perturbations of each chosen preserve vector (a one-operator variant of SPEED's DPA)."""

    copies: int = Field(
        ge=1, le=MAX_AUGMENT_COPIES, description="perturbed copies of each chosen preserve vector"
    )
    scale: float = Field(
        default=0.1,
        ge=0,
        allow_inf_nan=False,
        description="size of a perturbation relative to its vector's norm",
    )
    directions: int = Field(
        default=1,
        ge=1,
        description="the perturbations lie in the span of this many weakest right-singular "
        "directions of the group's stacked W_old (SPEED uses 1, per layer)",
    )
    seed: int = Field(default=0, ge=0, description="seed of the perturbations")


class AutoPreserve(_Strict):
    """Preserve only the candidates the edit would move most (SPEED's influence-based filtering)."""

    top: int = Field(
        ge=1,
        le=MAX_AUTO_TOP,
        description="how many of the group's concepts to preserve: those whose outputs the edit "
        "without them moves most (text-side drift per concept)",
    )
    augment: AugmentPreserve | None = Field(
        default=None,
        description="also preserve seeded perturbations of each chosen vector, e.g. "
        "{copies: 4, scale: 0.1, seed: 0} (off by default; docs/design.md §8)",
    )


class PreserveGroup(ConceptSource):
    """Concepts whose outputs must not move (all of them, or with `auto` the most affected)."""

    auto: AutoPreserve | None = Field(
        default=None,
        description="treat the group as candidates and preserve the `top` most affected, e.g. "
        "{top: 50}; the edit log records the choice and every candidate's drift",
    )

    exclude_edited: bool = Field(
        default=False,
        description="drop concepts that are also edited (e.g. preserve a full artist list but the "
        "erased ones) instead of refusing the recipe",
    )


class Solver(_Strict):
    """Scales of the closed form (docs/design.md); None means the alignment mode's default."""

    lam: Number | None = Field(default=None, alias="lambda", description="ridge term λ")
    erase_scale: Number | None = Field(default=None, description="s_e")
    preserve_scale: Number | Literal["auto"] | None = Field(
        default=None, description="s_p; auto = max(0.1, 1/(1+|P|))"
    )
    method: SolverMethod | None = Field(
        default=None,
        description="least-squares (UCE, default) | null-space (preserved vectors do not move: "
        "the update is restricted to the preserve Gram's low-eigenvalue directions)",
    )
    null_space_threshold: Number | None = Field(
        default=None,
        description="null-space: the preserve Gram's directions with eigenvalue < threshold × "
        "the mean squared norm of a preserve vector are free (0 < t ≤ 1; default 1e-3); a "
        "preserved vector then moves by ≤ ‖ΔW‖·sqrt(t)·rms norm",
    )
    keep_exact: list[KeepExact] | None = Field(
        default=None,
        description="vectors kept exactly by either method: sot (the start-of-text token), "
        'empty (the empty prompt "")',
    )

    @field_validator("null_space_threshold")
    @classmethod
    def _threshold_in_range(cls, value: float | None) -> float | None:
        if value is not None:
            hint = "a relative eigenvalue threshold, 0 < t ≤ 1 (default 1e-3)"
            _check_number(value, 0.0, 1.0, hint)
            if value == 0:
                raise ValueError(f"must be > 0 — {hint}")
        return value

    @model_validator(mode="after")
    def _threshold_needs_null_space(self) -> Solver:
        if self.null_space_threshold is not None and self.method != "null-space":
            raise ValueError(
                "`null_space_threshold` only applies with `method: null-space` — set the method "
                "or remove the threshold"
            )
        return self

    @field_validator("lam", "erase_scale", "preserve_scale")
    @classmethod
    def _scale_in_range(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int):
            hint = (
                f"scales are numbers in 0…{MAX_SCALE:g} (defaults: lambda 0.5, erase_scale 1, "
                "preserve_scale auto)"
            )
            if math.isfinite(value) and value < 0:
                raise ValueError(f"must be >= 0 — {hint}")
            _check_number(value, 0.0, MAX_SCALE, hint)
        return value


class Layers(_Strict):
    """Which editable projections are edited (left out: every one the model's family has, less
    those it edits only when named, like SDXL's ``add_embedding``)."""

    projections: list[Projection] = Field(default_factory=lambda: ["to_k", "to_v"], min_length=1)


class Output(_Strict):
    """Where and in which formats the edit is written."""

    dir: str | None = Field(default=None, description="output folder, relative to the recipe")
    formats: list[OutputFormat] = Field(
        default_factory=lambda: ["diffusers", "delta"], min_length=1
    )


class Harden(_Strict):
    """RECE-style hardening (``harden:``): rounds of the closed-form embedding attack, each adding
    (e* → the concept's guide) to the erase statistics and solving again from the base weights.
    Absent: the edit is today's, bit for bit."""

    rounds: int = Field(
        default=1, ge=1, le=100, strict=True, description="attack → re-solve rounds"
    )
    gamma: Number | Literal["auto"] = Field(
        default="auto",
        description="ridge γ of the attack (≥ 0); auto keeps ‖e*‖ within real token vectors' norms",
    )
    target: Literal["guide"] = Field(
        default="guide", description="what each attack embedding is edited towards"
    )
    tolerance: Number = Field(
        default=0.01,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="stop early once the attack recovers less than this share of the erasure gap",
    )

    @field_validator("gamma")
    @classmethod
    def _gamma_in_range(cls, value: float | str) -> float | str:
        if isinstance(value, float | int):
            hint = "gamma is a number >= 0, or auto"
            if math.isfinite(value) and value < 0:
                raise ValueError(f"must be >= 0, got {value:g} — {hint}")
            _check_number(value, 0.0, MAX_SCALE, hint)
        return value


class Recipe(_Strict):
    """A whole UCE edit, as written in a recipe file."""

    model: NonEmptyStr = Field(description="hub id, local diffusers folder, or builtin:tiny-sd")
    revision: str | None = Field(default=None, description="hub revision (branch, tag, commit)")
    alignment: Alignment = "paper"
    erase: list[EraseGroup] = Field(default_factory=list)
    moderate: list[ModerateGroup] = Field(default_factory=list)
    debias: list[DebiasGroup] = Field(default_factory=list)
    preserve: list[PreserveGroup] = Field(default_factory=list)
    debias_loop: DebiasLoop | None = Field(
        default=None, description="settings of Algorithm 1, for debias groups with `alphas: auto`"
    )
    solver: Solver = Field(default_factory=Solver)
    layers: Layers = Field(default_factory=Layers)
    output: Output = Field(default_factory=Output)
    seed: int = Field(default=0, strict=True)
    evaluate: Evaluate | None = Field(
        default=None, description="how `uce eval` judges the edit (prompt sets, metrics, expect)"
    )
    harden: Harden | None = Field(
        default=None, description="RECE-style hardening rounds against the embedding attack"
    )

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int) -> int:
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"{shorten(value)} is outside 0…{MAX_SEED} (2**63 - 1)")
        return value

    @model_validator(mode="after")
    def _has_edit(self) -> Recipe:
        if not (self.erase or self.moderate or self.debias):
            raise ValueError(
                "no edit section — add at least one of `erase`, `moderate` or `debias`"
            )
        if self.debias_loop is not None and not any(g.alphas == "auto" for g in self.debias):
            raise ValueError(
                "`debias_loop` is set but no debias group has `alphas: auto` — remove it, or set "
                "`alphas: auto` on the group whose α the loop should find"
            )
        if self.harden is not None and not (self.erase or self.moderate):
            raise ValueError(
                "`harden` hardens erased and moderated concepts, but this recipe only debiases — "
                "remove `harden`, or add the concepts to erase/moderate"
            )
        if self.harden is not None and any(g.alphas == "auto" for g in self.debias):
            raise ValueError(
                "`harden` cannot run with the debias loop (`alphas: auto`) — give the alphas "
                "explicitly, or remove `harden`"
            )
        return self


# Fields added after the first release: left out of the normalized recipe while unset, so the
# hash (and edit log) of a recipe that does not use them stays what it was.
UNSET_OMITTED = {
    "": ("harden",),
    "solver": ("method", "null_space_threshold", "keep_exact"),
    "preserve": ("auto",),
}


def dump_recipe(recipe: Recipe) -> dict[str, Any]:
    """The normalized recipe (aliases, JSON types), newer fields left out while unset."""
    dumped = recipe.model_dump(mode="json", by_alias=True)
    for key in UNSET_OMITTED[""]:
        if dumped.get(key) is None:
            dumped.pop(key, None)
    for key in UNSET_OMITTED["solver"]:
        if dumped["solver"].get(key) is None:
            dumped["solver"].pop(key, None)
    for group in dumped["preserve"]:
        for key in UNSET_OMITTED["preserve"]:
            if group.get(key) is None:
                group.pop(key, None)
        if group.get("auto") and group["auto"].get("augment") is None:
            group["auto"].pop("augment", None)
    return dumped


def recipe_sha256(recipe: Recipe) -> str:
    """Hash of the normalized recipe (aliases, sorted keys), stable across formatting changes.

    ``evaluate:`` is left out: it says how an edit is judged, not what the edit is.
    """
    dumped = dump_recipe(recipe)
    dumped.pop("evaluate", None)
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


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('erase', 0, 'guide') → 'erase.0.guide'; a user-written key is shown short and printable."""
    if not loc:
        return "(top level)"
    return ".".join(show_name(part) if isinstance(part, str) else str(part) for part in loc)


def _is_union_tag(part: str | int) -> bool:
    # pydantic names union branches by their type, e.g. 'str', 'list[str]', "literal['auto']".
    return isinstance(part, str) and (
        "[" in part or part in ("str", "float", "int", "bool", "constrained-str")
    )


# What a value of the wrong type should have been, by pydantic error type.
_WANTED: dict[str, str] = {
    "string_type": "a string",
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "list_type": "a list",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def _wanted(item: dict[str, Any]) -> str | None:
    """The phrase for a type error ('a number', "'paper' or 'last-token'"), None for other errors."""
    if item["type"] == "literal_error":
        return str(item["msg"]).removeprefix("Input should be ")
    return _WANTED.get(item["type"])


def _got(value: Any, wanted: str = "") -> str:
    # An unquoted 1984 or 2024-01-01 is a number or a date in YAML, not text.
    scalar = not isinstance(value, str | list | dict) and value is not None
    quote = " — quote it to make it text" if scalar and "a string" in wanted else ""
    return f" (got {shorten(value)}){quote}"


def _problems_from(error: ValidationError, label: str) -> list[str]:
    """One line per problem; the branches of a union collapse into a single message."""
    merged: dict[tuple, list[dict[str, Any]]] = {}
    for item in error.errors(include_url=False):
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
            continue
        wants = [_wanted(i) for i in items]
        if len(items) > 1 and all(wants):
            wanted = " or ".join(dict.fromkeys(w for w in wants if w))
            problems.append(
                f"{label}: {format_loc(key)}: must be {wanted}{_got(items[0]['input'], wanted)}"
            )
        else:
            # A branch whose type matched failed on the value: that failure is the problem.
            chosen = [i for i, w in zip(items, wants, strict=True) if not w] or items[:1]
            problems += [_line(label, key, item) for item in chosen]
    return list(dict.fromkeys(problems))


def _message(loc: tuple[str | int, ...], item: dict[str, Any]) -> tuple[tuple[str | int, ...], str]:
    """The location to report and the project's wording of one pydantic error."""
    kind, ctx = item["type"], item.get("ctx") or {}
    wanted = _wanted(item)
    if kind == "extra_forbidden" and loc:
        return loc[:-1], f"unknown key `{show_name(loc[-1])}`"
    if kind == "missing" and loc:
        return loc[:-1], f"missing required key `{loc[-1]}`"
    if wanted is not None:
        return loc, f"must be {wanted}{_got(item['input'], wanted)}"
    if kind == "invalid_key":
        return loc[:-1], f"key {shorten(loc[-1])} must be a string — quote it"
    if kind in ("too_short", "string_too_short"):
        return loc, "must not be empty"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        sign = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">"}.get(
            kind, "<"
        )
        bound = next(iter(ctx.values()), "")
        return loc, f"must be {sign} {bound}{_got(item['input'])}"
    if kind == "finite_number":
        return loc, f"must be a finite number{_got(item['input'])}"
    if kind == "recursion_loop":
        return loc, "refers to itself — a recipe cannot contain recursive YAML aliases"
    message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return loc, message.replace("Input should be ", "must be ")


def _line(label: str, loc: tuple[str | int, ...], item: dict[str, Any]) -> str:
    where, message = _message(loc, item)
    hint = _hint(item["type"], loc)
    return f"{label}: {format_loc(where)}: {message}" + (f" — {hint}" if hint else "")


def _hint(kind: str, loc: tuple[str | int, ...]) -> str:
    if kind == "extra_forbidden" and loc:
        model = _model_at(loc)
        if model is not None:
            allowed = _field_names(model)
            key = str(loc[-1])
            close = difflib.get_close_matches(key, allowed, n=1) if len(key) <= 40 else []
            if close:
                return f"did you mean `{close[0]}`? allowed keys: {', '.join(allowed)}"
            return f"allowed keys: {', '.join(allowed)}"
    if kind == "missing" and loc:
        model = _model_at(loc)
        field = model.model_fields.get(str(loc[-1])) if model else None
        if field is not None and field.description:
            return f"add it: {field.description}"
    return ""


def _text_problems(data: Any, loc: tuple[str | int, ...], label: str) -> list[str]:
    """Every string (key or value) holding a NUL, another control character or a lone surrogate."""
    problems: list[str] = []
    if isinstance(data, str):
        found = BAD_CHARACTERS.search(data)
        if found:
            problems.append(
                f"{label}: {format_loc(loc)}: {shorten(data)} contains the character "
                f"{found.group()!r} (a NUL, control character or lone surrogate) — remove it"
            )
    elif isinstance(data, dict):
        for key, value in data.items():
            problems += _text_problems(key, loc, label) if isinstance(key, str) else []
            problems += _text_problems(value, (*loc, str(key)), label)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            problems += _text_problems(value, (*loc, i), label)
    return problems


def parse_recipe(data: Any, label: str) -> Recipe:
    """Validate already-parsed YAML data into a Recipe, raising RecipeError with every problem."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise RecipeError(
            [
                f"{label}: the recipe is {kind}, not a mapping — start with `model:` and an edit section"
            ]
        )
    recipe: Recipe | None = None
    try:
        problems = _text_problems(data, (), label)
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += _problems_from(exc, label)
    except RecursionError:
        problems = [f"{label}: the recipe is nested too deeply — a recipe is a few levels deep"]
    except SchemaError as exc:  # Ctrl-C while pydantic-core built a validator: still Ctrl-C
        if is_interrupt(exc):
            raise KeyboardInterrupt from None
        raise
    if problems:
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS
            problems = [*problems[:MAX_PROBLEMS], f"{label}: … and {more} more problems"]
        raise RecipeError(problems)
    assert recipe is not None
    return recipe


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but is refused in a recipe (alias bomb, duplicate key, tag, nesting)."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with the limits a recipe needs.

    Aliases are counted at their expanded size (a 600-byte "billion laughs" file would otherwise
    expand to 10⁹ nodes in whatever walks it), nesting is bounded (deep nesting would exhaust the
    stack), duplicate keys are errors (YAML silently keeps the last), and only the plain tags are
    accepted (``!!set`` would make concept order depend on the hash seed; ``!!binary``,
    ``!!timestamp`` and ``!!python/…`` have no place in a recipe).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded: dict[int, int] = {}  # id(node) → node count with aliases expanded
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._expanded:
                raise _Refused(
                    problem=f"alias *{event.anchor} refers to the collection that contains it — "
                    "a recipe cannot be recursive",
                    problem_mark=event.start_mark,
                )
            return node
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in PLAIN_TAGS:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise _Refused(
                problem=f"the YAML tag {show_name(shown)} is not allowed in a recipe — remove it "
                "(recipes use plain strings, numbers, lists and mappings)",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(
                problem=f"nested more than {MAX_YAML_DEPTH} levels deep — a recipe is a few "
                "levels deep",
                problem_mark=event.start_mark,
            )
        node = super().compose_node(parent, index)
        self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._expanded[id(child)] for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._expanded[id(k)] + self._expanded[id(v)] for k, v in node.value)
        if size > MAX_YAML_NODES:
            raise _Refused(
                problem=f"this value expands to more than {MAX_YAML_NODES:,} YAML nodes "
                "(aliases are counted at their expanded size) — a recipe this large is refused; "
                "put long concept lists in a concepts_file",
                problem_mark=event.start_mark,
            )
        self._expanded[id(node)] = size
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _Refused(
                    problem=f"duplicate key {shorten(key)} (first on line {seen[key]}, again on "
                    f"line {line}) — keep one of them",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def _check_number_length(self, node: yaml.ScalarNode) -> None:
        if len(node.value) > MAX_NUMBER_CHARS:
            raise _Refused(
                problem=f"a number written with {len(node.value):,} characters is too large "
                "for a recipe",
                problem_mark=node.start_mark,
            )

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        self._check_number_length(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        self._check_number_length(node)
        return super().construct_yaml_float(node)


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor("tag:yaml.org,2002:float", _RecipeLoader.construct_yaml_float)
# YAML 1.1 (PyYAML) reads 1e-3 and 1.0e5 as strings; a recipe reads them as numbers (YAML 1.2).
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_recipe_data(path: Path) -> Any:
    """Read and YAML-parse a recipe file (``yaml.safe_load`` semantics, bounded), with file-level errors."""
    label = str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RecipeError([f"{label}: no such file — check the path"]) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise RecipeError([f"{label}: cannot read ({reason})"]) from None
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise RecipeError([f"{label}: is a folder, not a recipe file"])
    if not stat.S_ISREG(mode):
        # A FIFO or device would block or never end: never open one.
        raise RecipeError([f"{label}: not a regular file (a pipe, socket or device) — give a file"])
    too_big = (
        f"{label}: the recipe is larger than {MAX_RECIPE_BYTES:,} bytes (1 MB), the limit for a "
        "recipe — put long concept lists in a concepts_file"
    )
    if info.st_size > MAX_RECIPE_BYTES:
        raise RecipeError([too_big])
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # the file may grow after the stat
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError([too_big])
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError([f"{label}: not a UTF-8 text file — a recipe is YAML text"]) from None
    except OSError as exc:
        raise RecipeError([f"{label}: cannot read ({exc.strerror})"]) from None
    if "\x00" in text:
        raise RecipeError([f"{label}: not a text file — a recipe is YAML text"])
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        kind = "" if isinstance(exc, _Refused) else "YAML syntax error: "
        raise RecipeError([f"{label}: {where}{kind}{problem}"]) from None
    except RecursionError:
        raise RecipeError([f"{label}: the recipe is nested too deeply to read"]) from None


def load_recipe(path: Path) -> Recipe:
    """Read, parse and validate a recipe file.

    Raises:
        RecipeError: listing every problem as ``file: field.path: message — hint``.
    """
    return parse_recipe(read_recipe_data(path), str(path))
