"""Sampling: seeded images from a base model and an edit of it, side by side, resumable.

An image is a pure function of (model, edit, prompt, negative prompt, seed, steps, guidance,
scheduler, size): each image gets its own CPU generator, so pixels do not depend on the batch it
was drawn in or on the device that drew it (beyond float rounding). With an edit, one pipeline is
loaded and the edited UNet tensors are swapped in and out of it (exact and cheap: the edit is a
few tensors), so a before/after comparison holds one UNet in memory.

Output layout under ``out``: ``base/<case>-<seed>.png``, ``edited/<case>-<seed>.png``,
``grids/<case>.png`` (``--compare``) and ``manifest.json``. Every PNG carries its parameters in
PNG text chunks; an image whose file already exists with the same parameters is skipped, so an
interrupted run over thousands of prompts resumes where it stopped.

Under ``accelerate launch`` row i of the prompt set is rank i % world's: that rank draws all its
images (each with its own seeded generator, so the pixels do not depend on the number of
processes), writes its grid, and lists them in ``manifest.rank-<K>.json``; after a barrier rank 0
merges the rank manifests into ``manifest.json`` (ordered as a one-process run writes it) and
removes them. Resume works per image, so a rerun may use another number of processes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from uce_cli import __version__
from uce_cli.artifacts.edits import (
    EditTensors,
    apply_edit,
    edit_base_model,
    edit_file_metadata,
    load_edit_tensors,
)
from uce_cli.artifacts.pipeline import image_size, load_pipeline, resolve_scheduler
from uce_cli.distributed import Ranks
from uce_cli.edit.prompts import MAX_SEED, PromptRow, file_stem
from uce_cli.errors import OutputError, UceError
from uce_cli.families.model import (
    BaseModelFiles,
    open_model,
    pick_device,
    pick_dtype,
    same_or_inside,
)
from uce_cli.grid import make_grid, write_png
from uce_cli.paths import expand_home
from uce_cli.progress import NullProgress, Progress
from uce_cli.safe_files import check_no_links, link_refusal, write_json
from uce_cli.weights.destination import check_sample_out, lock_sample_out, unlock_sample_out

MANIFEST_FILE = "manifest.json"
RANK_MANIFEST_GLOB = "manifest.rank-*.json"  # one per rank of a launched run, until rank 0 merges
MANIFEST_SCHEMA = 1
ROLES = ("base", "edited")
# Parameters that decide an image's pixels: an existing file is reused only if all of them match.
IDENTITY_KEYS = (
    "role", "prompt", "negative_prompt", "seed", "model", "edit_sha256",
    "steps", "guidance", "scheduler", "height", "width", "dtype",
)  # fmt: skip


@dataclass
class SampleOptions:
    """How to sample; ``None`` sizes and scheduler mean the model's own."""

    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    negative_prompt: str | None = None
    n: int = 1  # images per prompt, seeds seed, seed+1, …
    seed: int = 0  # for rows without their own seed
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class SampleResult:
    """What ``run_sample`` wrote: every image of the run, the grids, and what it cost."""

    out: Path
    manifest: Path
    images: list[dict[str, str]]
    grids: list[Path]
    generated: int
    skipped: int
    seconds: float  # spent generating images (not loading); the slowest rank's when launched
    warnings: list[str] = field(default_factory=list)
    share: RankShare | None = None  # this process's part, when launched with several

    @property
    def seconds_per_image(self) -> float | None:
        """Generation time per newly generated image; None when nothing was generated."""
        return self.seconds / self.generated if self.generated else None


@dataclass
class RankShare:
    """What one rank of a launched run drew: its images, of which ``generated`` are new."""

    rank: int
    world: int
    images: int
    generated: int

    def line(self) -> str:
        """``rank 1/2: 3 images (3 generated, 0 already there)``."""
        noun = "image" if self.images == 1 else "images"
        return (
            f"rank {self.rank}/{self.world}: {self.images} {noun} ({self.generated} generated, "
            f"{self.images - self.generated} already there)"
        )


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _Job:
    index: int  # the row's index in the prompt set: its rank is index % world
    row: PromptRow
    seed: int
    role: str
    path: Path
    meta: dict[str, str]
    done: bool = False
    generated: bool = False


def run_sample(
    rows: list[PromptRow],
    out: Path,
    model: str | None = None,
    edit: Path | None = None,
    compare: bool = False,
    options: SampleOptions | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> SampleResult:
    """Sample every prompt (``n`` seeds each) from the base model, the edited model, or both.

    Args:
        rows: prompts with case ids and optional per-row seeds (``read_prompts_csv``).
        out: output folder; created if missing, reused to resume.
        model: base model spec (hub id, folder, ``builtin:tiny-sd``); default: the edit's base.
        edit: an output folder of ``uce apply`` or an edit file; without it the model is sampled.
        compare: sample base and edited with identical seeds and write a grid per prompt.
        options: sampling settings.
        progress: stage/advance reporting.
        ranks: this process's rank under ``accelerate launch`` (``init_ranks``); alone by default.
            Every rank returns the whole run's images and totals.

    Raises:
        UceError: bad input (model, edit, scheduler, size, output) before any image is drawn.
    """
    options = options or SampleOptions()
    progress = progress or NullProgress()
    ranks = ranks or Ranks()
    if compare and edit is None:
        raise UceError("--compare needs --edit: base and edited images are compared")
    if model is None and edit is None:
        raise UceError("give --model, --edit, or both")
    if not rows:
        raise UceError("no prompts to sample — give --prompt or --prompts-file")
    _check_options(options)
    out = expand_home(out, "--out", OutputError)
    check_sample_out(out)  # a file, or a manifest.json uce did not write, is refused
    roles = ROLES if compare else (("edited",) if edit is not None else ("base",))
    for sub in (*roles, "grids"):  # uce's own folders: a link there would take the images away
        check_no_links(out / sub, out)
    warnings: list[str] = []

    progress.start("load model")
    revision = None
    if model is None:
        model, revision = edit_base_model(edit)  # type: ignore[arg-type]
    base = open_model(model, revision)
    for folder, what in ((base.root, "base model"), (edit, "edit")):
        if folder is not None and same_or_inside(out, folder):  # models are never written into
            raise OutputError(f"output {out} is inside the {what} {folder} — choose another --out")
    loaded_edit = load_edit_tensors(Path(edit), base) if edit is not None else None
    if loaded_edit is not None:
        if not loaded_edit.tensors:
            warnings.append(
                f"edit {edit} changes no tensor of {model}: edited images equal the base"
            )
        if loaded_edit.source.is_file():
            named = edit_file_metadata(loaded_edit.source).get("base_model", "")
            if named and named != model:
                warnings.append(
                    f"edit {edit} was made for {named}, sampled here on {model} (same layer shapes)"
                )
    if options.negative_prompt and base.family is not None and not base.family.negative_prompt:
        raise UceError(
            f"--negative-prompt: {base.family.label} pipelines take no negative prompt (their "
            "guidance is distilled: --guidance sets the guidance embedding) — leave it out"
        )
    scheduler_cls = resolve_scheduler(options.scheduler, base.root)
    height, width = image_size(base.root, options.height, options.width, base.denoiser)
    _check_family_settings(base, options, scheduler_cls.__name__, height, width)
    device = pick_device(options.device)
    if ranks.distributed and device.type == "cuda":
        device = ranks.state.device  # this rank's GPU, as accelerate assigned it
    dtype = pick_dtype(options.dtype, device, base.family.cuda_dtype if base.family else "fp16")

    roles = ROLES if compare else (("edited",) if loaded_edit else ("base",))
    common = {
        "negative_prompt": options.negative_prompt or "",
        "model": model,
        "steps": str(options.steps),
        "guidance": f"{options.guidance:g}",
        "scheduler": scheduler_cls.__name__,
        "height": str(height),
        "width": str(width),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,  # not part of an image's identity: only float rounding differs
        "uce_version": __version__,
    }
    edit_fields = {"edit": str(edit), "edit_sha256": loaded_edit.sha256} if loaded_edit else {}
    # The folder is locked only now that the input is valid: a refused run creates nothing.
    run_id = _lock(out, ranks)
    try:
        mine = ranks.share(list(enumerate(rows)))
        jobs = _plan_jobs(mine, roles, out, options, common, edit_fields)
        _mark_done(jobs)
        if compare:
            _refuse_foreign_grids([row for _, row in mine], out)
        todo = [j for j in jobs if not j.done]
        progress.finish()

        seconds = 0.0
        try:
            if todo:
                progress.start("load pipeline")
                pipe = load_pipeline(base.root, scheduler_cls, device, dtype, base.denoiser)
                progress.finish()
                t0 = time.perf_counter()
                _generate(
                    pipe, base.denoiser, todo, loaded_edit, options, height, width, progress,
                    base.family.sample_kwargs() if base.family is not None else {},
                )  # fmt: skip
                seconds = time.perf_counter() - t0
            grids = _write_grids(mine, jobs, out, common, edit_fields) if compare else []
        finally:
            # Also after an interrupt: the manifest then lists what was drawn before it.
            if out.is_dir():
                if ranks.distributed:
                    _write_rank_manifest(out, ranks.rank, jobs, common, edit_fields, run_id)
                else:
                    _write_manifest(out, jobs, common, edit_fields, run_id)
        generated = sum(j.generated for j in jobs)
        images = [(j.index, {"path": j.path.relative_to(out).as_posix(), **j.meta}) for j in jobs]
        result = SampleResult(
            out=out,
            manifest=out / MANIFEST_FILE,
            images=[entry for _, entry in images],
            grids=grids,
            generated=generated,
            skipped=len(jobs) - generated,
            seconds=seconds,
            warnings=warnings,
        )
        if ranks.distributed:
            result = _merge_ranks(result, images, ranks, common, edit_fields, run_id)
        return result
    finally:
        if ranks.main:
            unlock_sample_out(out, run_id)


def _lock(out: Path, ranks: Ranks) -> str:
    """Rank 0 takes the folder's lock; every rank learns the run id (or rank 0's refusal)."""
    outcome: tuple[str, str] = ("", "")
    if ranks.main:
        try:
            outcome = ("run", lock_sample_out(out))
        except OutputError as exc:
            outcome = ("error", str(exc))
    if ranks.distributed:
        outcome = ranks.broadcast(outcome)
    if outcome[0] == "error":
        raise OutputError(outcome[1])
    return outcome[1]


def _merge_ranks(
    mine: SampleResult,
    images: list[tuple[int, dict[str, str]]],
    ranks: Ranks,
    common: dict[str, str],
    edit_fields: dict[str, str],
    run_id: str,
) -> SampleResult:
    """Every rank's images and totals on every rank; rank 0 merges the manifests.

    The gather is collective, so it is also the barrier: every rank manifest is on disk when rank 0
    reads them.
    """
    parts = ranks.gather((images, mine.grids, mine.generated, mine.seconds))
    merged = sorted((entry for part in parts for entry in part[0]), key=lambda e: e[0])
    if ranks.main:
        _write_manifest(mine.out, [], common, edit_fields, run_id)
    ranks.barrier()  # nobody returns (and reads manifest.json) before rank 0 has written it
    generated = sum(part[2] for part in parts)
    return SampleResult(
        out=mine.out,
        manifest=mine.manifest,
        images=[entry for _, entry in merged],  # stable sort: a row's images stay in order
        grids=sorted((g for part in parts for g in part[1]), key=lambda p: p.name),
        generated=generated,
        skipped=len(merged) - generated,
        seconds=max(part[3] for part in parts),
        warnings=mine.warnings,
        share=RankShare(ranks.rank, ranks.world, len(images), mine.generated),
    )


# Classifier-free guidance beyond this only overflows: SD uses 1–20.
MAX_GUIDANCE = 1000.0


def _check_options(o: SampleOptions) -> None:
    problems = [
        f"--{name} {value} must be at least 1"
        for name, value in (("steps", o.steps), ("n", o.n), ("batch-size", o.batch_size))
        if value < 1
    ]
    if not 0 <= o.seed <= MAX_SEED - o.n:
        problems.append(f"--seed {o.seed} must be in 0…{MAX_SEED - o.n}")
    for name, value in (("height", o.height), ("width", o.width)):
        if value is not None and (value < 8 or value % 8):
            problems.append(f"--{name} {value} must be a positive multiple of 8")
    if not (math.isfinite(o.guidance) and 0 <= o.guidance <= MAX_GUIDANCE):
        problems.append(
            f"--guidance {o.guidance:g} must be a number from 0 to {MAX_GUIDANCE:g} (usually "
            "7.5; 1 or less turns classifier-free guidance off)"
        )
    if problems:
        raise UceError("\n".join(problems))


def _check_family_settings(
    base: BaseModelFiles, o: SampleOptions, scheduler: str, height: int, width: int
) -> None:
    """Refuse a size or step count the family's pipeline would reject deep inside its call."""
    family = base.family
    if family is None:
        return
    multiple = family.size_multiple
    for name, value, given in (("height", height, o.height), ("width", width, o.width)):
        if value % multiple:
            what = (
                f"--{name} {value}" if given is not None else f"the model's default {name} {value}"
            )
            raise UceError(
                f"{what}: {family.label} pipelines need a height and width divisible by "
                f"{multiple} — use e.g. --{name} {max(multiple, value // multiple * multiple)}"
            )
    refusal = family.sampling_refusal(o.steps, scheduler)
    if refusal is not None:
        raise UceError(refusal)


def _plan_jobs(
    rows: list[tuple[int, PromptRow]],
    roles: tuple[str, ...],
    out: Path,
    o: SampleOptions,
    common: dict[str, str],
    edit_fields: dict[str, str],
) -> list[_Job]:
    jobs = []
    for index, row in rows:
        first = row.seed if row.seed is not None else o.seed
        for seed in range(first, first + o.n):
            for role in roles:
                meta = {
                    "role": role,
                    "prompt": row.prompt,
                    "case_number": row.case,
                    "seed": str(seed),
                    **common,
                    **(edit_fields if role == "edited" else {"edit": "", "edit_sha256": ""}),
                }
                jobs.append(
                    _Job(
                        index,
                        row,
                        seed,
                        role,
                        out / role / f"{file_stem(row.case)}-{seed}.png",
                        meta,
                    )
                )
    return jobs


def _mark_done(jobs: list[_Job]) -> None:
    """Mark jobs whose image exists with the same parameters; refuse one made differently."""
    clashes = []
    for job in jobs:
        if job.path.is_symlink():  # never read or write an image through a link
            raise OutputError(link_refusal(job.path))
        if not job.path.exists():
            continue
        try:
            with Image.open(job.path) as im:
                found = {k: str(v) for k, v in im.info.items() if isinstance(v, str)}
        except OSError:
            found = {}
        diff = [k for k in IDENTITY_KEYS if found.get(k) != job.meta[k]]
        if diff:
            clashes.append(
                f"{job.path} ({diff[0]}: {found.get(diff[0])!r} here, {job.meta[diff[0]]!r} now)"
            )
        job.done = True
    if clashes:
        more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
        raise OutputError(
            f"{clashes[0]}{more} already exist, made with other settings — choose another --out "
            "(a folder resumes only the run that made it)"
        )


def _refuse_foreign_grids(rows: list[PromptRow], out: Path) -> None:
    """A grid this run may rewrite must be one uce drew (its PNG text has ``uce_version``)."""
    for row in rows:
        path = out / "grids" / f"{file_stem(row.case)}.png"
        if path.is_symlink():
            raise OutputError(link_refusal(path))
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            with Image.open(path) as im:
                ours = "uce_version" in im.info
        except OSError:
            ours = False
        if not ours:
            raise OutputError(
                f"{path} exists and was not drawn by uce sample — it would be overwritten; "
                "choose another --out"
            )


def _generate(
    pipe: Any,
    denoiser: str,
    todo: list[_Job],
    edit: EditTensors | None,
    o: SampleOptions,
    height: int,
    width: int,
    progress: Progress,
    family_kwargs: dict[str, Any],
) -> None:
    """Draw the images of ``todo``, a batch at a time, swapping the edit into the pipeline's
    ``denoiser`` (the family's) only for its jobs; ``family_kwargs`` go to every pipeline call."""
    progress.start(
        f"sampling {len(todo)} images × {o.steps} steps", total=len(todo) * o.steps, unit="step"
    )
    saved: dict[str, torch.Tensor] | None = None  # base tensors while the edit is swapped in
    batch: list[_Job] = []

    def step_done(_pipe: Any, _step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        progress.advance(len(batch))
        return kwargs

    # Work goes prompt by prompt, batch_size (prompt, seed) pairs at a time, base then edited:
    # an interrupted compare run has both images of every pair it finished.
    pairs: dict[tuple[str, int], list[_Job]] = {}
    for job in todo:
        pairs.setdefault((job.row.case, job.seed), []).append(job)
    order = list(pairs)
    try:
        for start in range(0, len(order), o.batch_size):
            chunk = [j for key in order[start : start + o.batch_size] for j in pairs[key]]
            for role in ROLES:
                batch = [j for j in chunk if j.role == role]
                if not batch:
                    continue
                if role == "edited" and saved is None and edit is not None:
                    saved = apply_edit(getattr(pipe, denoiser), edit.tensors)
                elif role == "base" and saved is not None:
                    apply_edit(getattr(pipe, denoiser), saved)
                    saved = None
                # absent when not given: each pipeline's own default ("" for PixArt/Sana,
                # which fail on None)
                negative = {"negative_prompt": [o.negative_prompt] * len(batch)}
                if not o.negative_prompt:
                    negative = {}
                images = pipe(
                    prompt=[j.row.prompt for j in batch],
                    num_inference_steps=o.steps,
                    guidance_scale=o.guidance,
                    height=height,
                    width=width,
                    # One CPU generator per image: pixels do not depend on batch or device.
                    generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
                    output_type="pil",
                    callback_on_step_end=step_done,
                    **negative,
                    **family_kwargs,
                ).images
                for job, image in zip(batch, images, strict=True):
                    write_png(image, job.path, job.meta, job.path.parents[1])
                    job.done = job.generated = True
    finally:
        if saved is not None:
            apply_edit(getattr(pipe, denoiser), saved)
        progress.finish()


# ---------------------------------------------------------------------------------------------
# Manifest and grids


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json(path, payload, root=path.parent)


def _job_entries(out: Path, jobs: list[_Job]) -> dict[str, dict[str, str]]:
    """The manifest entries of the jobs whose image is on disk, by relative path."""
    entries = {}
    for job in jobs:
        if job.path.is_file():
            rel = job.path.relative_to(out).as_posix()
            entries[rel] = {"path": rel, **job.meta}
    return entries


def _read_entries(out: Path, path: Path) -> dict[str, dict[str, str]]:
    """The entries of a manifest whose image is still on disk; none if it is unreadable."""
    entries = {}
    try:
        for entry in json.loads(path.read_text(encoding="utf-8")).get("images", []):
            if (out / entry["path"]).is_file():
                entries[entry["path"]] = entry
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # unreadable: rebuilt from the images of this run
    return entries


def _run_of(path: Path) -> str | None:
    """The run id a rank manifest was written by, None if it is not a readable one."""
    try:
        if path.is_symlink():
            return None
        run = json.loads(path.read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return run if isinstance(run, str) else None


def _write_rank_manifest(
    out: Path,
    rank: int,
    jobs: list[_Job],
    common: dict[str, str],
    edit_fields: dict[str, str],
    run_id: str,
) -> Path:
    """manifest.rank-<rank>.json: this rank's images on disk, tagged with the run, for rank 0."""
    path = out / f"manifest.rank-{rank}.json"
    entries = _job_entries(out, jobs)
    _write_json(
        path,
        {
            "schema": MANIFEST_SCHEMA,
            "rank": rank,
            "run": run_id,
            "settings": {**common, **edit_fields},
            "images": [entries[k] for k in sorted(entries)],
        },
    )
    return path


def _write_manifest(
    out: Path,
    jobs: list[_Job],
    common: dict[str, str],
    edit_fields: dict[str, str],
    run_id: str,
) -> Path:
    """manifest.json: every image on disk of this run, plus entries of earlier runs still on disk.

    This run's rank manifests (tagged ``run_id``) are merged in and then removed; one left by
    another run (killed before its merge) is ignored: its images are listed again by the run that
    resumes them, under that run's settings.
    """
    path = out / MANIFEST_FILE
    entries: dict[str, dict[str, str]] = {}
    if path.is_file() and not path.is_symlink():
        entries = _read_entries(out, path)
    rank_files = [p for p in sorted(out.glob(RANK_MANIFEST_GLOB)) if _run_of(p) == run_id]
    for rank_file in rank_files:
        entries.update(_read_entries(out, rank_file))
    entries.update(_job_entries(out, jobs))
    grids = sorted(p.relative_to(out).as_posix() for p in (out / "grids").glob("*.png"))
    _write_json(
        path,
        {
            "schema": MANIFEST_SCHEMA,
            "settings": {**common, **edit_fields},
            "images": [entries[k] for k in sorted(entries)],
            "grids": grids,
        },
    )
    for rank_file in rank_files:
        rank_file.unlink(missing_ok=True)
    return path


def _write_grids(
    rows: list[tuple[int, PromptRow]],
    jobs: list[_Job],
    out: Path,
    common: dict[str, str],
    edit_fields: dict[str, str],
) -> list[Path]:
    """One grid per prompt; rewritten when missing or when any of its images was just drawn."""
    by_row: dict[str, list[_Job]] = {}
    for job in jobs:
        by_row.setdefault(job.row.case, []).append(job)
    caption = f"model {common['model']} · edit {Path(edit_fields['edit']).name} ({edit_fields['edit_sha256'][:12]})"
    written = []
    for _, row in rows:
        row_jobs = by_row[row.case]
        path = out / "grids" / f"{file_stem(row.case)}.png"
        written.append(path)
        if path.exists() and not any(j.generated for j in row_jobs):
            continue
        panels = []
        for role in ROLES:
            cells = []
            for j in (j for j in row_jobs if j.role == role):
                with Image.open(j.path) as im:
                    cells.append((j.seed, im.copy()))
            panels.append((role, cells))
        grid, labels = make_grid(row.prompt, panels, caption)
        seeds = [str(s) for s, _ in panels[0][1]]
        meta = {
            "prompt": row.prompt,
            "case_number": row.case,
            "seeds": ",".join(seeds),
            "labels": json.dumps(labels, ensure_ascii=False),
            **common,
            **edit_fields,
        }
        write_png(grid, path, meta, out)
    return written
