"""The edit plan: a validated recipe resolved into prompt pairs and preserve prompts (pure Python).

Resolution expands templates per alignment mode (docs/design.md), reads concept files, removes
duplicates, refuses conflicts and fills in the mode's default scales. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uce_cli.edit.prompts import check_regular_file
from uce_cli.edit.recipe import (
    BAD_CHARACTERS,
    DEFAULT_NULL_SPACE_THRESHOLD,
    MAX_CONCEPT_CHARS,
    MAX_CONCEPTS,
    AugmentPreserve,
    ConceptSource,
    DebiasGroup,
    DebiasLoop,
    EraseGroup,
    Harden,
    ModerateGroup,
    Recipe,
    dump_recipe,
    fill_template,
    load_recipe,
    recipe_sha256,
    shorten,
    show_name,
)
from uce_cli.edit.upstream import UPSTREAM_PREFIX, upstream_source
from uce_cli.errors import DataError, RecipeError
from uce_cli.paths import expand_home
from uce_cli.weights.modelspec import BUILTIN_PREFIX, looks_like_local_path

# Prompt templates of the published runs; the named sets also keep the bare concept.
TEMPLATE_SETS: dict[str, list[str]] = {
    "art": ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"],
    "object": ["image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"],
    "none": [],
}

# Bounds checked before any model is opened. A concepts file is a list of names (the largest
# upstream file, coco_30k.csv, is 2.4 MB); a plan's prompts are encoded one by one, so their
# number bounds the encoding time and the statistics' memory (the largest published plan has
# ~12,000 prompts).
MAX_CONCEPTS_FILE_BYTES = 16 * 2**20
MAX_PROMPTS = 200_000
# The debias loop's work ceiling, in image sampling steps (rounds × prompts × images per prompt
# × steps, at most): the published gender loop is 30 × 185 × 50 × 20 = 5.55 M (and less, as
# prompts converge). ``uce apply --allow-long`` runs a loop beyond it.
MAX_LOOP_WORK = 10_000_000

# Per-mode defaults: (lambda, erase_scale, preserve_scale); "auto" = max(0.1, 1/(1+|P|)).
MODE_DEFAULTS: dict[str, tuple[float, float, float | str]] = {
    "paper": (0.5, 1.0, "auto"),
    "last-token": (0.5, 1.0, 1.0),
}


@dataclass(frozen=True)
class EditPair:
    """One edited prompt: its vectors c(source) get targets W_old · Σ_k w_k c(prompt_k).

    Erase and moderate have one target (the guide, weight 1); debias has the source itself plus
    one attribute prompt per attribute weighted by alpha: Eq. 9 when ``relative`` is False; when
    True, per layer T ← W·C, then T ← T + α_j·‖T‖_F·(W·A_j)/‖W·A_j‖_F (the published code).
    ``desired`` (one ratio per attribute) marks an ``alphas: auto`` item, whose α the debias loop
    sets (0 in the plan).
    """

    section: str
    concept: str
    source: str
    targets: tuple[tuple[str, float], ...]
    relative: bool = False
    attributes: tuple[str, ...] = ()
    desired: tuple[float, ...] = ()

    @property
    def auto(self) -> bool:
        """True for an item of Algorithm 1 (``alphas: auto``)."""
        return bool(self.desired)


@dataclass(frozen=True)
class AutoCandidates:
    """A ``preserve`` group with ``auto``: candidate concepts (with their prompts), of which the
    ``top`` the edit moves most are preserved (``uce_cli.edit.autopreserve``)."""

    section: str
    top: int
    concepts: dict[str, list[str]]  # concept → its prompts (templates expanded)
    augment: AugmentPreserve | None = None  # seeded perturbations of the chosen vectors


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
    # Paths as written in the recipe (relative to its folder), by field: "model" (a local path),
    # "output.dir", "<section>.<i>.concepts_file". The resolved paths above are absolute or
    # recipe-folder based; these are what an edit log records.
    recipe_paths: dict[str, str] = field(default_factory=dict)
    loop: DebiasLoop | None = None  # Algorithm 1's settings when some debias group is `auto`
    # True when the recipe names layers.projections; otherwise every editable projection of the
    # model's family is edited (to_k/to_v on SD, context_embedder/text_embedder on FLUX/SD3).
    projections_given: bool = False
    method: str = "least-squares"  # solver.method
    null_space_threshold: float = DEFAULT_NULL_SPACE_THRESHOLD
    keep_exact: tuple[str, ...] = ()  # solver.keep_exact: "sot", "empty"
    auto_preserve: list[AutoCandidates] = field(default_factory=list)
    auto_choices: list[dict[str, Any]] = field(default_factory=list)  # filled in by `uce apply`
    harden: Harden | None = None  # RECE-style hardening rounds; None: today's edit, bit for bit

    @property
    def per_layer(self) -> bool:
        """True when some target is norm-relative, so the edit is not W_old·K (no operator)."""
        return any(pair.relative for pair in self.pairs)

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
            **self.solver_options(),
        }

    def solver_options(self) -> dict[str, Any]:
        """The newer solver settings, only where the recipe uses them (older logs stay as they were)."""
        options: dict[str, Any] = {}
        if self.method != "least-squares":
            options["method"] = self.method
            options["null_space_threshold"] = self.null_space_threshold
        if self.keep_exact:
            options["keep_exact"] = list(self.keep_exact)
        if self.auto_preserve:
            options["auto_preserve"] = [
                {"section": a.section, "top": a.top, "candidates": len(a.concepts)}
                | ({"augment": a.augment.model_dump()} if a.augment is not None else {})
                for a in self.auto_preserve
            ]
        return options


def _norm(concept: str) -> str:
    return re.sub(r"\s+", " ", concept.strip()).casefold()


def expand(concept: str, templates: str | list[str]) -> list[str]:
    """Prompts for one concept: the bare concept plus a named set, or exactly a custom list.

    One prompt per template, each holding the concept verbatim (never ``str.format``, whose
    escapes and format specs could merge concepts or allocate without bound).
    """
    if isinstance(templates, list):
        return [fill_template(t, concept) for t in templates]
    return [concept] + [fill_template(t, concept) for t in TEMPLATE_SETS[templates]]


def _regular_file(path: Path, what: str) -> None:
    """Refuse anything but an existing regular file, without opening it (a FIFO would block)."""
    check_regular_file(path, what, "paths are relative to the recipe", "a txt or csv file")


def read_concepts_file(group: ConceptSource, base_dir: Path) -> list[str]:
    """Concepts listed in a txt (one per line) or csv (``column``) file, duplicates removed."""
    name = group.concepts_file or ""
    column = group.column
    if name.startswith(UPSTREAM_PREFIX):
        # a shipped list (no column) when uce ships the one asked for, else the fetched file
        path, column = upstream_source(name[len(UPSTREAM_PREFIX) :], column)
    else:
        path = base_dir / expand_home(name, "recipe: concepts_file", RecipeError)
    _regular_file(path, "concepts file")
    too_big = (
        f"concepts file {path} is larger than {MAX_CONCEPTS_FILE_BYTES // 2**20} MB, the limit for "
        "a list of concepts — split it, or check it is the file you meant"
    )
    try:
        if path.stat().st_size > MAX_CONCEPTS_FILE_BYTES:
            raise DataError(too_big)
        with open(path, "rb") as f:
            raw = f.read(MAX_CONCEPTS_FILE_BYTES + 1)  # the file may grow after the stat
        if len(raw) > MAX_CONCEPTS_FILE_BYTES:
            raise DataError(too_big)
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read concepts file {path} as UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            columns = [c for c in (reader.fieldnames or []) if c]
            if column is None:
                raise DataError(f"{path} is a csv: set `column` to one of: {', '.join(columns)}")
            if column not in columns:
                raise DataError(
                    f"{path} has no column '{show_name(column)}' — columns: {', '.join(columns)}"
                )
            values = [(row.get(column) or "").strip() for row in reader]
        except csv.Error as exc:
            raise DataError(f"{path}: not a readable csv file ({exc})") from None
    else:
        if column is not None:
            raise DataError(f"{path} is not a csv, so `column` does not apply — remove it")
        values = [line.strip() for line in text.splitlines()]
    for i, value in enumerate(values):
        if len(value) > MAX_CONCEPT_CHARS:
            raise DataError(
                f"{path}: concept #{i} is {len(value):,} characters long, more than the "
                f"{MAX_CONCEPT_CHARS:,} a concept may have — a concept is a name or short phrase "
                "(one per line)"
            )
        if BAD_CHARACTERS.search(value):
            raise DataError(
                f"{path}: concept #{i} {shorten(value)} contains a NUL or another control "
                "character — fix the file"
            )
    concepts = list(dict.fromkeys(v for v in values if v))
    if len(concepts) > MAX_CONCEPTS:
        raise DataError(
            f"{path} lists {len(concepts):,} concepts, more than the {MAX_CONCEPTS:,} a group may "
            "use — split it over several groups or recipes"
        )
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
    section: str, group: DebiasGroup, concepts: list[str], mode: str, problems: list[str]
) -> list[EditPair]:
    """One pair per prompt of each concept; attribute prompts replace the concept in the prompt.

    ``image of doctor`` → ``image of male`` (the published code, both modes: in last-token mode
    it is the template expansion of the attribute, as guides are expanded, and for the bare
    concept it is the attribute alone, as the 2025 code encodes it).
    """
    where = section
    attributes = list(group.attributes)
    relative = (group.alpha_scale or ("relative" if mode == "paper" else "absolute")) == "relative"
    auto = group.alphas == "auto"
    desired = tuple(group.desired_ratios()) if auto else ()
    templates = _templates_with_bare(group.templates)
    for template in templates:
        fixed = fill_template(template, " ")
        clash = next((c for c in concepts if _norm(c) in _norm(fixed)), None)
        if clash is not None:
            problems.append(
                f"{where}.templates: '{template}' already contains '{clash}' outside {{}} — the "
                "attribute prompts replace the concept, so it must occur once; use another template"
            )
            return []
    pairs = []
    for concept in concepts:
        same = [a for a in attributes if _norm(a) == _norm(concept)]
        if same:
            problems.append(
                f"{where}.attributes: '{same[0]}' is the concept itself — an attribute must differ "
                f"from the concept '{concept}' it debiases"
            )
            continue
        for template in templates:
            alphas = [0.0] * len(attributes) if auto else [group.alphas[a] for a in attributes]  # type: ignore[index]
            source = fill_template(template, concept)
            targets = [(source, 1.0)]
            targets += [
                (fill_template(template, a), alpha)
                for a, alpha in zip(attributes, alphas, strict=True)
            ]
            pairs.append(
                EditPair(
                    section,
                    concept,
                    source,
                    tuple(targets),
                    relative,
                    tuple(attributes),
                    desired,
                )
            )
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
    expected = 0  # prompts the groups read so far will expand to, bounded by MAX_PROMPTS

    groups: list[tuple[str, ConceptSource]] = [
        *((f"erase.{i}", g) for i, g in enumerate(recipe.erase)),
        *((f"moderate.{i}", g) for i, g in enumerate(recipe.moderate)),
        *((f"debias.{i}", g) for i, g in enumerate(recipe.debias)),
    ]
    for where, group in groups:
        concepts = _concepts(group, where, base_dir, problems)
        expected += len(concepts) * len(_templates_with_bare(group.templates))
        if expected > MAX_PROMPTS:
            break  # refused below, before the prompts are built
        if isinstance(group, EraseGroup):
            guides = _guides(group, concepts, where, problems)
            new = _erase_pairs(where, concepts, guides, group.templates, mode) if guides else []
        elif isinstance(group, ModerateGroup):
            new = _erase_pairs(where, concepts, [""] * len(concepts), group.templates, mode)
        else:
            assert isinstance(group, DebiasGroup)
            new = _debias_pairs(where, group, concepts, mode, problems)
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
                f"{label}: {pair.section}: prompt '{show_name(pair.source)}' is already edited by "
                f"{previous.section} with another target — edit each concept once"
            )

    # The published erase script preserves "" (paper mode); its debias script does not.
    only_debias = not (recipe.erase or recipe.moderate)
    preserve: list[str] = [""] if mode == "paper" and not only_debias else []
    auto_preserve: list[AutoCandidates] = []
    n_auto = 0  # prompts the auto groups will add (for preserve_scale auto)
    for i, group in enumerate(recipe.preserve):
        where = f"preserve.{i}"
        concepts = _concepts(group, where, base_dir, problems)
        expected += len(concepts) * len(_templates_with_bare(group.templates))
        if expected > MAX_PROMPTS:
            break
        kept = []
        for concept in concepts:
            other = edited.get(_norm(concept))
            if other is None:
                kept.append(concept)
            elif not group.exclude_edited:
                problems.append(
                    f"{label}: {where}: '{show_name(concept)}' is both preserved and edited ({other}) — "
                    "remove it from one of them, or set `exclude_edited: true` on this group"
                )
        prompts = [p for c in kept for p in expand(c, group.templates)]
        sections[where] = {
            "concepts": len(kept),
            "excluded": len(concepts) - len(kept),
            "prompts": len(prompts),
        }
        if group.auto is not None:
            if kept:
                candidates = {c: expand(c, group.templates) for c in kept}
                auto_preserve.append(
                    AutoCandidates(where, group.auto.top, candidates, group.auto.augment)
                )
                n_auto += min(group.auto.top, len(kept)) * len(next(iter(candidates.values())))
            sections[where]["auto_top"] = group.auto.top
            continue
        preserve += prompts
    preserve = list(dict.fromkeys(preserve))

    if expected > MAX_PROMPTS:
        problems.append(
            f"{label}: the plan has more than {MAX_PROMPTS:,} prompts (concepts × templates over "
            "the edit and preserve groups), more than uce encodes in one edit — use fewer "
            "concepts or templates"
        )
    model = resolve_model_spec(recipe.model, base_dir)
    problems += _check_model(recipe.model, model, label)
    if auto_preserve and any(p.auto for p in unique_pairs):
        problems.append(
            f"{auto_preserve[0].section}.auto: preserve auto measures the edit's drift, which the "
            "debias loop (alphas: auto) changes every iteration — give the alphas explicitly or "
            "list the preserved concepts"
        )
    relative = [p.section for p in unique_pairs if p.relative]
    if relative and "operator" in recipe.output.formats:
        problems.append(f"output.formats: {operator_refusal(relative[0])}")
    problems = [p if p.startswith(label + ":") else f"{label}: {p}" for p in problems]
    if problems:
        raise RecipeError(problems)

    lam, erase_scale, preserve_scale = MODE_DEFAULTS[mode]
    solver = recipe.solver
    lam = solver.lam if solver.lam is not None else lam
    erase_scale = solver.erase_scale if solver.erase_scale is not None else erase_scale
    if only_debias and mode == "paper":
        preserve_scale = 0.1  # the published debias script's s_p
    preserve_scale = solver.preserve_scale if solver.preserve_scale is not None else preserve_scale
    if preserve_scale == "auto":
        n_preserve = len([p for p in preserve if p != ""]) + n_auto
        preserve_scale = max(0.1, 1.0 / (1 + n_preserve))

    out = output_dir
    if out is None and recipe.output.dir is not None:
        out = base_dir / expand_home(recipe.output.dir, "recipe: output.dir", RecipeError)

    return EditPlan(
        model=model,
        revision=recipe.revision,
        alignment=mode,
        pairs=unique_pairs,
        preserve=preserve,
        lam=float(lam),
        erase_scale=float(erase_scale),
        preserve_scale=float(preserve_scale),
        projections=list(dict.fromkeys(recipe.layers.projections)),
        projections_given="projections" in recipe.layers.model_fields_set,
        formats=list(dict.fromkeys(recipe.output.formats)),
        output_dir=out,
        seed=recipe.seed,
        recipe=dump_recipe(recipe),
        recipe_sha256=recipe_sha256(recipe),
        source_file=label,
        sections=sections,
        recipe_paths=_recipe_paths(recipe, model),
        loop=(recipe.debias_loop or DebiasLoop()) if any(p.auto for p in unique_pairs) else None,
        method=solver.method or "least-squares",
        null_space_threshold=float(
            solver.null_space_threshold
            if solver.null_space_threshold is not None
            else DEFAULT_NULL_SPACE_THRESHOLD
        ),
        keep_exact=tuple(dict.fromkeys(solver.keep_exact or ())),
        auto_preserve=auto_preserve,
        harden=recipe.harden,
    )


def loop_work(plan: EditPlan) -> dict[str, int] | None:
    """The debias loop's work at most (every prompt sampled every round), or None without a loop.

    ``image_steps`` = rounds × prompts × images per prompt × steps: the denoiser passes of one
    image (two with guidance) the loop may run; ``ceiling`` is ``MAX_LOOP_WORK``.
    """
    if plan.loop is None:
        return None
    loop = plan.loop
    prompts = sum(1 for p in plan.pairs if p.auto)
    images = len(loop.seeds) * loop.images_per_seed
    return {
        "rounds": loop.max_iterations,
        "prompts": prompts,
        "images_per_prompt": images,
        "steps": loop.steps,
        "image_steps": loop.max_iterations * prompts * images * loop.steps,
        "ceiling": MAX_LOOP_WORK,
    }


def check_loop_work(plan: EditPlan, allow_long: bool = False) -> None:
    """Refuse a debias loop whose work at most exceeds ``MAX_LOOP_WORK``, unless ``allow_long``.

    Raises:
        RecipeError: naming the recipe, the estimate, its factors and the ceiling.
    """
    work = loop_work(plan)
    if work is None or allow_long or work["image_steps"] <= MAX_LOOP_WORK:
        return
    raise RecipeError(
        [
            f"{plan.source_file}: debias_loop: up to {work['image_steps']:,} image sampling steps "
            f"({work['rounds']} rounds × {work['prompts']} prompt(s) × "
            f"{work['images_per_prompt']} images × {work['steps']} steps), beyond the ceiling of {MAX_LOOP_WORK:,} — lower "
            "max_iterations, seeds, images_per_seed or steps, or pass --allow-long to run it"
        ]
    )


def operator_refusal(section: str) -> str:
    """Why an edit with norm-relative debias targets has no operator (format or transfer)."""
    return (
        f"the operator format needs an edit W_new = W_old·K, but {section} uses norm-relative "
        "debias targets (alpha_scale: relative), solved per layer — drop `operator` (delta, LoRA "
        "and the other formats work) or set alpha_scale: absolute"
    )


def _recipe_paths(recipe: Recipe, model: str) -> dict[str, str]:
    """The recipe's paths as written (relative to its folder), by field, for the edit log."""
    paths: dict[str, str] = {}
    if model != recipe.model or looks_like_local_path(recipe.model):  # a local path
        paths["model"] = recipe.model
    for section in ("erase", "moderate", "debias", "preserve"):
        for i, group in enumerate(getattr(recipe, section)):
            if group.concepts_file is not None:
                paths[f"{section}.{i}.concepts_file"] = group.concepts_file
    if recipe.output.dir is not None:
        paths["output.dir"] = recipe.output.dir
    return paths


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # e.g. a name too long for the file system
        return False


def resolve_model_spec(model: str, base_dir: Path) -> str:
    """A model that names a path (existing, or shaped like one) becomes an absolute path.

    Relative paths are relative to the recipe's folder; hub ids and ``builtin:`` stay as they are.
    """
    if model.startswith(BUILTIN_PREFIX):
        return model
    candidate = base_dir / expand_home(model, "recipe: model", RecipeError)
    if _exists(candidate) or looks_like_local_path(model):
        try:
            return str(candidate.resolve())
        except (OSError, RuntimeError):  # a symlink loop: keep the path as written
            return str(candidate.absolute())
    return model


def _check_model(model: str, resolved: str, label: str) -> list[str]:
    """A local model path that does not exist, found before any weights library is imported."""
    if not looks_like_local_path(model) or _exists(Path(resolved)):
        return []
    return [
        f"{label}: model: local path {show_name(resolved, 300)} does not exist — check the path "
        "(a relative path is relative to the recipe's folder), or give a hub id such as "
        "CompVis/stable-diffusion-v1-4"
    ]


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
