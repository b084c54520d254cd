"""The edit plan: a validated recipe resolved into prompt pairs and preserve prompts (pure Python).

Resolution expands templates per alignment mode (DESIGN §1), reads concept files, removes
duplicates, refuses conflicts and fills in the mode's default scales. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uce_cli.errors import DataError, RecipeError
from uce_cli.recipe import (
    ConceptSource,
    DebiasGroup,
    EraseGroup,
    ModerateGroup,
    Recipe,
    load_recipe,
    recipe_sha256,
)
from uce_cli.upstream import UPSTREAM_PREFIX, upstream_source

# Prompt templates of the published runs; the named sets also keep the bare concept.
TEMPLATE_SETS: dict[str, list[str]] = {
    "art": ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"],
    "object": ["image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"],
    "none": [],
}

# Per-mode defaults: (lambda, erase_scale, preserve_scale); "auto" = max(0.1, 1/(1+|P|)).
MODE_DEFAULTS: dict[str, tuple[float, float, float | str]] = {
    "paper": (0.5, 1.0, "auto"),
    "last-token": (0.5, 1.0, 1.0),
}


@dataclass(frozen=True)
class EditPair:
    """One edited prompt: its vectors c(source) get targets W_old · Σ_k w_k c(prompt_k).

    Erase and moderate have one target (the guide, weight 1); debias has the source itself plus
    one attribute prompt per attribute weighted by alpha (Eq. 9).
    """

    section: str
    concept: str
    source: str
    targets: tuple[tuple[str, float], ...]


@dataclass
class EditPlan:
    """Everything ``uce apply`` needs besides weights; printable by ``--dry-run``."""

    model: str
    revision: str | None
    alignment: str
    pairs: list[EditPair]
    preserve: list[str]
    lam: float
    erase_scale: float
    preserve_scale: float
    projections: list[str]
    formats: list[str]
    output_dir: Path | None
    seed: int
    recipe: dict[str, Any]
    recipe_sha256: str
    source_file: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prompts(self) -> list[str]:
        """Every unique prompt to encode (sources, targets, preserve), in first-seen order."""
        seen: dict[str, None] = {}
        for pair in self.pairs:
            seen.setdefault(pair.source)
            for prompt, _ in pair.targets:
                seen.setdefault(prompt)
        for prompt in self.preserve:
            seen.setdefault(prompt)
        return list(seen)

    def summary(self) -> dict[str, Any]:
        """Counts and scales, as shown by ``--dry-run`` and stored in the edit log."""
        return {
            "model": self.model,
            "revision": self.revision,
            "alignment": self.alignment,
            "edit_prompts": len(self.pairs),
            "preserve_prompts": len(self.preserve),
            "unique_prompts": len(self.prompts()),
            "lambda": self.lam,
            "erase_scale": self.erase_scale,
            "preserve_scale": self.preserve_scale,
            "projections": self.projections,
            "sections": self.sections,
        }


def _norm(concept: str) -> str:
    return re.sub(r"\s+", " ", concept.strip()).casefold()


def expand(concept: str, templates: str | list[str]) -> list[str]:
    """Prompts for one concept: the bare concept plus a named set, or exactly a custom list."""
    if isinstance(templates, list):
        return [t.format(concept) for t in templates]
    return [concept] + [t.format(concept) for t in TEMPLATE_SETS[templates]]


def read_concepts_file(group: ConceptSource, base_dir: Path) -> list[str]:
    """Concepts listed in a txt (one per line) or csv (``column``) file, duplicates removed."""
    name = group.concepts_file or ""
    column = group.column
    if name.startswith(UPSTREAM_PREFIX):
        # a shipped list (no column) when uce ships the one asked for, else the fetched file
        path, column = upstream_source(name[len(UPSTREAM_PREFIX) :], column)
    else:
        path = (base_dir / name).expanduser()
    if not path.is_file():
        raise DataError(f"concepts file {path} does not exist — paths are relative to the recipe")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read concepts file {path} as UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = [c for c in (reader.fieldnames or []) if c]
        if column is None:
            raise DataError(f"{path} is a csv: set `column` to one of: {', '.join(columns)}")
        if column not in columns:
            raise DataError(f"{path} has no column '{column}' — columns: {', '.join(columns)}")
        values = [(row.get(column) or "").strip() for row in reader]
    else:
        if column is not None:
            raise DataError(f"{path} is not a csv, so `column` does not apply — remove it")
        values = [line.strip() for line in text.splitlines()]
    concepts = list(dict.fromkeys(v for v in values if v))
    if not concepts:
        raise DataError(f"concepts file {path} lists no concepts")
    return concepts


def _concepts(group: ConceptSource, where: str, base_dir: Path, problems: list[str]) -> list[str]:
    if group.concepts is not None:
        return list(dict.fromkeys(c.strip() for c in group.concepts))
    try:
        return read_concepts_file(group, base_dir)
    except DataError as exc:
        problems.append(f"{where}.concepts_file: {exc}")
        return []


def _guides(group: EraseGroup, concepts: list[str], where: str, problems: list[str]) -> list[str]:
    guide = group.guide
    if guide is None:
        guide = "art" if group.templates == "art" else ""
    guides = [guide] if isinstance(guide, str) else list(guide)
    if len(guides) == 1:
        return guides * len(concepts)
    if len(guides) != len(concepts):
        problems.append(
            f"{where}.guide: {len(guides)} guides for {len(concepts)} concepts — give one guide "
            "for all concepts or exactly one per concept"
        )
        return []
    return guides


def _erase_pairs(
    section: str, concepts: list[str], guides: list[str], templates: str | list[str], mode: str
) -> list[EditPair]:
    pairs = []
    for concept, guide in zip(concepts, guides, strict=True):
        sources = expand(concept, templates)
        if mode == "paper" or guide == "":
            # paper: templates expand sources only; "" stays the unconditional prompt in any mode.
            targets = [guide] * len(sources)
        else:
            targets = expand(guide, templates)
        pairs += [
            EditPair(section, concept, s, ((t, 1.0),))
            for s, t in zip(sources, targets, strict=True)
        ]
    return pairs


def _debias_pairs(
    section: str, group: DebiasGroup, concepts: list[str], where: str, problems: list[str]
) -> list[EditPair]:
    if group.alphas == "auto":
        problems.append(
            f"{where}.alphas: `auto` (the sample → classify → update loop of Algorithm 1) is not "
            "available in this version — give one number per attribute, e.g. {male: 0.3, female: 0.2}"
        )
        return []
    pairs = []
    for concept in concepts:
        for template in _templates_with_bare(group.templates):
            targets = [(template.format(concept), 1.0)]
            targets += [
                (template.format(f"{a} {concept}"), group.alphas[a]) for a in group.attributes
            ]
            pairs.append(EditPair(section, concept, template.format(concept), tuple(targets)))
    return pairs


def _templates_with_bare(templates: str | list[str]) -> list[str]:
    return list(templates) if isinstance(templates, list) else ["{}"] + TEMPLATE_SETS[templates]


def resolve_plan(recipe: Recipe, source_file: Path, output_dir: Path | None = None) -> EditPlan:
    """Resolve a validated recipe into an EditPlan.

    Args:
        recipe: the validated recipe.
        source_file: the recipe's path; relative paths inside it are resolved from its folder.
        output_dir: overrides ``output.dir`` (the CLI's ``--out``).

    Raises:
        RecipeError: every plan-level problem (files, conflicts, count mismatches) at once.
    """
    label = str(source_file)
    base_dir = source_file.parent
    mode = recipe.alignment
    problems: list[str] = []
    pairs: list[EditPair] = []
    sections: dict[str, dict[str, Any]] = {}
    edited: dict[str, str] = {}  # normalized concept → section that edits it

    groups: list[tuple[str, ConceptSource]] = [
        *((f"erase.{i}", g) for i, g in enumerate(recipe.erase)),
        *((f"moderate.{i}", g) for i, g in enumerate(recipe.moderate)),
        *((f"debias.{i}", g) for i, g in enumerate(recipe.debias)),
    ]
    for where, group in groups:
        concepts = _concepts(group, where, base_dir, problems)
        if isinstance(group, EraseGroup):
            guides = _guides(group, concepts, where, problems)
            new = _erase_pairs(where, concepts, guides, group.templates, mode) if guides else []
        elif isinstance(group, ModerateGroup):
            new = _erase_pairs(where, concepts, [""] * len(concepts), group.templates, mode)
        else:
            assert isinstance(group, DebiasGroup)
            new = _debias_pairs(where, group, concepts, where, problems)
        for concept in concepts:
            edited.setdefault(_norm(concept), where)
        sections[where] = {"concepts": len(concepts), "prompts": len(new)}
        pairs += new

    # Duplicates: an identical pair twice is dropped; one source with two targets is refused.
    by_source: dict[str, EditPair] = {}
    unique_pairs: list[EditPair] = []
    for pair in pairs:
        previous = by_source.get(pair.source)
        if previous is None:
            by_source[pair.source] = pair
            unique_pairs.append(pair)
        elif previous.targets != pair.targets:
            problems.append(
                f"{label}: {pair.section}: prompt '{pair.source}' is already edited by "
                f"{previous.section} with another target — edit each concept once"
            )

    preserve: list[str] = [""] if mode == "paper" else []
    for i, group in enumerate(recipe.preserve):
        where = f"preserve.{i}"
        concepts = _concepts(group, where, base_dir, problems)
        kept = []
        for concept in concepts:
            other = edited.get(_norm(concept))
            if other is None:
                kept.append(concept)
            elif not group.exclude_edited:
                problems.append(
                    f"{label}: {where}: '{concept}' is both preserved and edited ({other}) — "
                    "remove it from one of them, or set `exclude_edited: true` on this group"
                )
        prompts = [p for c in kept for p in expand(c, group.templates)]
        sections[where] = {
            "concepts": len(kept),
            "excluded": len(concepts) - len(kept),
            "prompts": len(prompts),
        }
        preserve += prompts
    preserve = list(dict.fromkeys(preserve))

    problems = [p if p.startswith(label + ":") else f"{label}: {p}" for p in problems]
    if problems:
        raise RecipeError(problems)

    lam, erase_scale, preserve_scale = MODE_DEFAULTS[mode]
    solver = recipe.solver
    lam = solver.lam if solver.lam is not None else lam
    erase_scale = solver.erase_scale if solver.erase_scale is not None else erase_scale
    preserve_scale = solver.preserve_scale if solver.preserve_scale is not None else preserve_scale
    if preserve_scale == "auto":
        n_preserve = len([p for p in preserve if p != ""])
        preserve_scale = max(0.1, 1.0 / (1 + n_preserve))

    out = output_dir
    if out is None and recipe.output.dir is not None:
        out = (base_dir / recipe.output.dir).expanduser()

    return EditPlan(
        model=resolve_model_spec(recipe.model, base_dir),
        revision=recipe.revision,
        alignment=mode,
        pairs=unique_pairs,
        preserve=preserve,
        lam=float(lam),
        erase_scale=float(erase_scale),
        preserve_scale=float(preserve_scale),
        projections=list(dict.fromkeys(recipe.layers.projections)),
        formats=list(dict.fromkeys(recipe.output.formats)),
        output_dir=out,
        seed=recipe.seed,
        recipe=recipe.model_dump(mode="json", by_alias=True),
        recipe_sha256=recipe_sha256(recipe),
        source_file=label,
        sections=sections,
    )


def resolve_model_spec(model: str, base_dir: Path) -> str:
    """A model that names an existing path relative to the recipe becomes that absolute path."""
    if model.startswith("builtin:"):
        return model
    candidate = (base_dir / model).expanduser()
    if candidate.exists() or model.startswith((".", "/", "~")):
        return str(candidate.resolve())
    return model


def plan_recipe(path: Path, output_dir: Path | None = None) -> EditPlan:
    """Load, validate and resolve a recipe file in one step."""
    return resolve_plan(load_recipe(path), path, output_dir)


def override_model(plan: EditPlan, model: str) -> None:
    """Point a plan at another base model (``uce apply --model``); relative paths are from the
    current folder, and the recipe's revision no longer applies."""
    if not model.strip():
        raise RecipeError(["--model: empty model — give a hub id, a folder or builtin:tiny-sd"])
    plan.model = resolve_model_spec(model, Path.cwd())
    plan.revision = None
