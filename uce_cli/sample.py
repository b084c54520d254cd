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
"""

from __future__ import annotations

import csv
import difflib
import filecmp
import hashlib
import json
import os
import re
import textwrap
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open

from uce_cli import __version__
from uce_cli.errors import DataError, ModelError, OutputError, UceError
from uce_cli.model import (
    CROSS_ATTN_KEY,
    DENOISER,
    BaseModelFiles,
    open_model,
    pick_device,
    pick_dtype,
    same_or_inside,
)
from uce_cli.progress import NullProgress, Progress

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = 1
DELTA_FORMAT = "uce-delta"
ROLES = ("base", "edited")
MAX_SEED = 2**63 - 1
# Parameters that decide an image's pixels: an existing file is reused only if all of them match.
IDENTITY_KEYS = (
    "role", "prompt", "negative_prompt", "seed", "model", "edit_sha256",
    "steps", "guidance", "scheduler", "height", "width", "dtype",
)  # fmt: skip
GRID_MIN_PANEL = 256  # grid panels are upscaled (nearest) to at least this many pixels


@dataclass(frozen=True)
class PromptRow:
    """One prompt to sample: its text, case id (file name stem) and optional per-row seed."""

    prompt: str
    case: str
    seed: int | None = None


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
class EditTensors:
    """UNet tensors to swap into the base model, where they came from, and their hash."""

    source: Path
    tensors: dict[str, torch.Tensor]  # denoiser keys without the "unet." prefix
    sha256: str


@dataclass
class SampleResult:
    """What ``run_sample`` wrote: every image of the run, the grids, and what it cost."""

    out: Path
    manifest: Path
    images: list[dict[str, str]]
    grids: list[Path]
    generated: int
    skipped: int
    seconds: float  # spent generating images (not loading)
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float | None:
        """Generation time per newly generated image; None when nothing was generated."""
        return self.seconds / self.generated if self.generated else None


# ---------------------------------------------------------------------------------------------
# Prompts


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
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist — check the path")
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
                stem = _file_stem(case)
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


def _file_stem(case: str) -> str:
    # Case ids come from user files: keep them readable but safe as a file name.
    return re.sub(r"[^\w.-]", "_", case).lstrip(".") or "_"


# ---------------------------------------------------------------------------------------------
# Edits


def edit_base_model(path: Path) -> tuple[str, str | None]:
    """The base model an edit was made for: ``(spec, revision)`` from its edit log or metadata.

    Raises:
        UceError: not an edit, or it does not name its base model.
    """
    if path.is_dir():
        log_file = path / "edit_log.json"
        if log_file.is_file():
            from uce_cli.editlog import read_edit_log

            base = read_edit_log(path).get("base_model", {})
            if base.get("spec"):
                return base["spec"], base.get("revision")
        if (path / "edit.safetensors").is_file():
            return edit_base_model(path / "edit.safetensors")
        raise UceError(f"--edit {path}: no edit_log.json naming the base model — pass --model")
    metadata = _edit_file_metadata(path)
    if not metadata.get("base_model"):
        raise UceError(f"--edit {path}: its metadata names no base model — pass --model")
    return metadata["base_model"], metadata.get("base_revision") or None


def load_edit_tensors(path: Path, base: BaseModelFiles) -> EditTensors:
    """Read an edit as UNet tensors that replace the base's, checked against the base model.

    ``path`` is an output folder of ``uce apply`` (its UNet, verified to differ from the base only
    in cross-attention k/v tensors, and every other component byte-identical; a folder holding
    only ``edit.safetensors`` is read as that file), or an edit file (``format`` metadata:
    ``uce-delta``). A new edit format is one more branch here that returns the tensors.

    Raises:
        UceError: not an edit, or an edit made for a different base model.
    """
    if not path.exists():
        raise UceError(
            f"--edit {path} does not exist — give an output folder of `uce apply` or its edit file"
        )
    if path.is_dir():
        if (path / DENOISER).is_dir():
            tensors = _folder_edit_tensors(path, base)
        elif (path / "edit.safetensors").is_file():
            return load_edit_tensors(path / "edit.safetensors", base)
        else:
            raise UceError(
                f"--edit {path}: neither a pipeline folder ({DENOISER}/) nor an edit.safetensors "
                "— give an output folder of `uce apply` or its edit file"
            )
    else:
        fmt = _edit_file_metadata(path).get("format", "")
        if fmt == DELTA_FORMAT:
            tensors = _delta_edit_tensors(path, base)
        else:
            raise UceError(
                f"--edit {path}: unknown edit format {fmt!r} — uce sample reads {DELTA_FORMAT} files "
                "(edit.safetensors) and output folders of `uce apply`"
            )
    return EditTensors(path, tensors, tensors_sha256(tensors))


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors (names, dtypes, shapes, bytes): the same edit hashes the same from
    an output folder and from its edit.safetensors."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _edit_file_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        raise UceError(
            f"--edit {path}: not a .safetensors edit file or an output folder of `uce apply`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError on a corrupt header
        raise UceError(
            f"--edit {path}: cannot read it ({exc}) — the file is corrupt or not safetensors"
        ) from None


def _tensor_index(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key → (file, shape) of every tensor in safetensors files, from the headers only."""
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                index[key] = (path, tuple(f.get_slice(key).get_shape()))
    return index


def _different_base(source: Path, base: BaseModelFiles, problems: list[str]) -> UceError:
    shown = "; ".join(problems[:3]) + (f"; … {len(problems) - 3} more" if len(problems) > 3 else "")
    return UceError(
        f"edit {source} was made for a different base model than {base.spec}: {shown} — pass the "
        "base it was made from with --model (`uce show` on the edit's folder names it)"
    )


def _delta_edit_tensors(path: Path, base: BaseModelFiles) -> dict[str, torch.Tensor]:
    shapes = {k: s for k, (_, s) in _tensor_index(base.denoiser_files).items()}
    tensors: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            component, _, name = key.partition(".")
            if component != DENOISER:
                raise UceError(
                    f"--edit {path}: tensor {key} edits '{component}'; uce sample applies UNet edits only"
                )
            tensor = f.get_tensor(key)
            if name not in shapes:
                problems.append(f"key {name} is missing from its UNet")
            elif tuple(tensor.shape) != shapes[name]:
                problems.append(f"{name} has shape {tuple(tensor.shape)} vs {shapes[name]}")
            tensors[name] = tensor
    if problems:
        raise _different_base(path, base, problems)
    if not tensors:
        raise UceError(f"--edit {path}: the file holds no tensors")
    return tensors


def _folder_edit_tensors(folder: Path, base: BaseModelFiles) -> dict[str, torch.Tensor]:
    """The folder's UNet tensors that differ from the base's; only cross-attention k/v may."""
    edited = open_model(str(folder))
    ours, theirs = _tensor_index(edited.denoiser_files), _tensor_index(base.denoiser_files)
    problems = [f"key {k} is missing from its UNet" for k in sorted(set(ours) - set(theirs))]
    problems += [f"its UNet has {k}, the edit does not" for k in sorted(set(theirs) - set(ours))]
    problems += [
        f"{k} has shape {ours[k][1]} vs {theirs[k][1]}"
        for k in sorted(set(ours) & set(theirs))
        if ours[k][1] != theirs[k][1]
    ]
    if problems:
        raise _different_base(folder, base, problems)
    changed: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = {
            p: stack.enter_context(safe_open(str(p), framework="pt"))
            for p in {*edited.denoiser_files, *base.denoiser_files}
        }
        for key in sorted(ours):
            new = handles[ours[key][0]].get_tensor(key)
            if not torch.equal(new, handles[theirs[key][0]].get_tensor(key)):
                if not CROSS_ATTN_KEY.match(key):
                    problems.append(f"{key} differs")
                changed[key] = new
    problems += _component_differences(folder, base.root)
    if problems:
        raise _different_base(folder, base, problems)
    return changed


def _component_differences(folder: Path, base_root: Path) -> list[str]:
    """Files of the folder's non-UNet components that are not byte-identical to the base's."""
    problems = []
    for src in sorted(folder.rglob("*")):
        rel = src.relative_to(folder)
        if (
            len(rel.parts) < 2
            or rel.parts[0] == DENOISER
            or rel.parts[0].startswith(".")
            or src.is_dir()
        ):
            continue
        other = base_root / rel
        if not other.is_file() or not filecmp.cmp(src, other, shallow=False):
            problems.append(f"{rel} differs")
    return problems


def apply_edit(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy ``tensors`` into the UNet's parameters (cast to their dtype and device).

    Returns:
        The replaced tensors (clones): ``apply_edit(unet, returned)`` restores the UNet exactly.
    """
    state = unet.state_dict()
    previous = {k: state[k].detach().clone() for k in tensors}
    unet.load_state_dict(tensors, strict=False)
    return previous


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _Job:
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

    Raises:
        UceError: bad input (model, edit, scheduler, size, output) before any image is drawn.
    """
    options = options or SampleOptions()
    progress = progress or NullProgress()
    if compare and edit is None:
        raise UceError("--compare needs --edit: base and edited images are compared")
    if model is None and edit is None:
        raise UceError("give --model, --edit, or both")
    if not rows:
        raise UceError("no prompts to sample — give --prompt or --prompts-file")
    _check_options(options)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder — choose another --out")
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
            named = _edit_file_metadata(loaded_edit.source).get("base_model", "")
            if named and named != model:
                warnings.append(
                    f"edit {edit} was made for {named}, sampled here on {model} (same layer shapes)"
                )
    scheduler_cls = resolve_scheduler(options.scheduler, base.root)
    height, width = _image_size(base.root, options)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)

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
    jobs = _plan_jobs(rows, roles, out, options, common, edit_fields)
    _mark_done(jobs)
    todo = [j for j in jobs if not j.done]
    progress.finish()

    seconds = 0.0
    try:
        if todo:
            progress.start("load pipeline")
            pipe = _load_pipeline(base.root, scheduler_cls, device, dtype)
            progress.finish()
            t0 = time.perf_counter()
            _generate(pipe, todo, loaded_edit, options, height, width, progress)
            seconds = time.perf_counter() - t0
        grids = _write_grids(rows, jobs, out, common, edit_fields) if compare else []
    finally:
        # Also after an interrupt: the manifest then lists what was drawn before it.
        if out.is_dir():
            _write_manifest(out, jobs, common, edit_fields)
    generated = sum(j.generated for j in jobs)
    return SampleResult(
        out=out,
        manifest=out / MANIFEST_FILE,
        images=[{"path": j.path.relative_to(out).as_posix(), **j.meta} for j in jobs],
        grids=grids,
        generated=generated,
        skipped=len(jobs) - generated,
        seconds=seconds,
        warnings=warnings,
    )


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
    if problems:
        raise UceError("\n".join(problems))


def _index_class(index: dict[str, Any], component: str) -> str:
    entry = index.get(component)
    if not isinstance(entry, list) or len(entry) != 2 or not entry[1]:
        raise ModelError(f"the model has no '{component}' in its model_index.json")
    return entry[1]


def resolve_scheduler(name: str | None, root: Path) -> type:
    """The diffusers scheduler class named ``name``, or the model's own when ``name`` is None.

    Raises:
        UceError: an unknown name, or a scheduler that does not fit the model's.
    """
    import diffusers
    from diffusers import SchedulerMixin

    index = json.loads((root / "model_index.json").read_text())
    current = _index_class(index, "scheduler")
    current_cls = getattr(diffusers, current, None)
    if not (isinstance(current_cls, type) and issubclass(current_cls, SchedulerMixin)):
        raise ModelError(f"{root}: its scheduler {current} is not a diffusers scheduler class")
    if name is None or name == current:
        return current_cls
    # ``compatibles`` is an instance property; a scheduler object costs only its config.
    compatibles = current_cls.from_config(current_cls.load_config(root / "scheduler")).compatibles
    names = sorted(c.__name__ for c in compatibles)
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UceError(
            f"--scheduler {name}: unknown scheduler — {hint}choose a diffusers scheduler class that "
            f"fits this model, e.g. {', '.join(names[:6])}"
        )
    if cls not in compatibles:
        raise UceError(
            f"--scheduler {name} does not fit this model's {current} — choose one of {', '.join(names)}"
        )
    return cls


def _image_size(root: Path, o: SampleOptions) -> tuple[int, int]:
    """Requested size, else the model's: UNet sample size × the VAE's downsampling factor."""
    try:
        unet = json.loads((root / DENOISER / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
        sample = unet["sample_size"]
        h, w = (sample, sample) if isinstance(sample, int) else sample
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ModelError(
            f"{root}: cannot read the image size from the unet/vae configs ({exc}) — pass --height and --width"
        ) from None
    return o.height or h * factor, o.width or w * factor


def _plan_jobs(
    rows: list[PromptRow],
    roles: tuple[str, ...],
    out: Path,
    o: SampleOptions,
    common: dict[str, str],
    edit_fields: dict[str, str],
) -> list[_Job]:
    jobs = []
    for row in rows:
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
                    _Job(row, seed, role, out / role / f"{_file_stem(row.case)}-{seed}.png", meta)
                )
    return jobs


def _mark_done(jobs: list[_Job]) -> None:
    """Mark jobs whose image exists with the same parameters; refuse one made differently."""
    clashes = []
    for job in jobs:
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


def _load_pipeline(
    root: Path, scheduler_cls: type, device: torch.device, dtype: torch.dtype
) -> Any:
    """The base pipeline on ``device`` in ``dtype``, with the chosen scheduler, bars off."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # uce reports its own progress; the libraries' loading bars would interleave with it.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # Loading in ``dtype`` (not casting afterwards) keeps fp32-only modules in fp32. Newer
            # diffusers call the keyword ``dtype`` and warn on ``torch_dtype``; older ones know
            # only ``torch_dtype``, which both accept.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                str(root), safety_checker=None, requires_safety_checker=False,
                use_safetensors=True, torch_dtype=dtype,
            )  # fmt: skip
    except Exception as exc:  # diffusers raises OSError/ValueError/etc. on broken folders
        raise ModelError(f"cannot load the pipeline from {root}: {exc}") from exc
    if not hasattr(pipe, DENOISER):
        raise ModelError(f"{root} holds a {type(pipe).__name__}; uce sample needs a UNet pipeline")
    if type(pipe.scheduler) is not scheduler_cls:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _generate(
    pipe: Any,
    todo: list[_Job],
    edit: EditTensors | None,
    o: SampleOptions,
    height: int,
    width: int,
    progress: Progress,
) -> None:
    """Draw the images of ``todo``, a batch at a time, swapping the edit in only for its jobs."""
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
                    saved = apply_edit(pipe.unet, edit.tensors)
                elif role == "base" and saved is not None:
                    apply_edit(pipe.unet, saved)
                    saved = None
                images = pipe(
                    prompt=[j.row.prompt for j in batch],
                    negative_prompt=[o.negative_prompt] * len(batch) if o.negative_prompt else None,
                    num_inference_steps=o.steps,
                    guidance_scale=o.guidance,
                    height=height,
                    width=width,
                    # One CPU generator per image: pixels do not depend on batch or device.
                    generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
                    output_type="pil",
                    callback_on_step_end=step_done,
                ).images
                for job, image in zip(batch, images, strict=True):
                    write_png(image, job.path, job.meta)
                    job.done = job.generated = True
    finally:
        if saved is not None:
            apply_edit(pipe.unet, saved)
        progress.finish()


# ---------------------------------------------------------------------------------------------
# Files


def write_png(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    """Write a PNG with ``text`` chunks atomically (temporary file in the same folder, then rename)."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)  # non-Latin-1 values become iTXt (UTF-8) chunks
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_manifest(
    out: Path, jobs: list[_Job], common: dict[str, str], edit_fields: dict[str, str]
) -> Path:
    """manifest.json: every image on disk of this run, plus entries of earlier runs still on disk."""
    path = out / MANIFEST_FILE
    entries: dict[str, dict[str, str]] = {}
    if path.is_file():
        try:
            for entry in json.loads(path.read_text(encoding="utf-8")).get("images", []):
                if (out / entry["path"]).is_file():
                    entries[entry["path"]] = entry
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            entries = {}  # unreadable: rebuilt from this run's images
    for job in jobs:
        if job.path.is_file():
            rel = job.path.relative_to(out).as_posix()
            entries[rel] = {"path": rel, **job.meta}
    grids = sorted(p.relative_to(out).as_posix() for p in (out / "grids").glob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        path,
        {
            "schema": MANIFEST_SCHEMA,
            "settings": {**common, **edit_fields},
            "images": [entries[k] for k in sorted(entries)],
            "grids": grids,
        },
    )
    return path


# ---------------------------------------------------------------------------------------------
# Grids


@dataclass(frozen=True)
class GridLayout:
    """Where everything sits in a compare grid: rows are models, columns are seeds."""

    panel: tuple[int, int]  # (width, height) of one upscaled image
    header: int  # height of the prompt text above the panels
    label: int  # height of the label strip under each panel
    pad: int
    rows: int
    cols: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid."""
        w = self.cols * self.panel[0] + (self.cols + 1) * self.pad
        h = self.header + self.rows * (self.panel[1] + self.label + self.pad) + self.pad
        return w, h

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the panel at ``row``, ``col``."""
        left = self.pad + col * (self.panel[0] + self.pad)
        top = self.header + self.pad + row * (self.panel[1] + self.label + self.pad)
        return left, top, left + self.panel[0], top + self.panel[1]


def grid_layout(image_size: tuple[int, int], rows: int, cols: int, header_lines: int) -> GridLayout:
    """The layout of a grid of ``rows`` × ``cols`` images of ``image_size`` (width, height)."""
    scale = max(1, -(-GRID_MIN_PANEL // max(image_size)))  # integer factor: crisp nearest upscale
    panel = (image_size[0] * scale, image_size[1] * scale)
    return GridLayout(panel, header=8 + 18 * header_lines, label=22, pad=8, rows=rows, cols=cols)


def _grid_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def make_grid(
    prompt: str, rows: list[tuple[str, list[tuple[int, Image.Image]]]], caption: str
) -> tuple[Image.Image, list[str]]:
    """A labelled grid: the prompt (and ``caption``) on top, one row per model, one column per seed.

    Args:
        prompt: shown wrapped (at most three lines, then "…").
        rows: ``(model label, [(seed, image), …])`` per row, same seeds in every row.
        caption: one more header line (model and edit).

    Returns:
        The grid image and its panel labels, row by row.
    """
    cols = len(rows[0][1])
    image_size = rows[0][1][0][1].size
    probe = grid_layout(image_size, len(rows), cols, 1)
    chars = max(20, probe.size[0] // 8)
    flat = " ".join(prompt.split()) or "(empty prompt)"
    lines = textwrap.wrap(flat, chars, max_lines=3, placeholder=" …") + [caption[: chars + 10]]
    layout = grid_layout(image_size, len(rows), cols, len(lines))
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    font = _grid_font()
    for i, line in enumerate(lines):
        draw.text((layout.pad, 6 + 18 * i), _drawable(line, font), fill="black", font=font)
    labels = []
    for r, (name, images) in enumerate(rows):
        for c, (seed, image) in enumerate(images):
            box = layout.box(r, c)
            grid.paste(image.convert("RGB").resize(layout.panel, Image.Resampling.NEAREST), box[:2])
            label = f"{name} · seed {seed}"
            draw.text((box[0], box[3] + 4), _drawable(label, font), fill="black", font=font)
            labels.append(label)
    return grid, labels


def _drawable(text: str, font: object) -> str:
    # The bitmap fallback font encodes Latin-1 only; FreeType draws missing glyphs as boxes.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _write_grids(
    rows: list[PromptRow],
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
    for row in rows:
        row_jobs = by_row[row.case]
        path = out / "grids" / f"{_file_stem(row.case)}.png"
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
        write_png(grid, path, meta)
    return written
