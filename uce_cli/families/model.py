"""The base model: resolve a model spec to a diffusers folder, find its family and the tensors it edits.

The denoiser is never instantiated: its editable tensors are read lazily from the safetensors files
(``safe_open``), so opening SD 1.4 costs the text encoder plus 19 M parameters, not 3.3 GB.
Only safetensors weights are read; pickle files are refused. A single-file checkpoint is converted
once, by its family's layout, into a cached diffusers folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from uce_cli.errors import ModelError
from uce_cli.families import open_family, single_file_layout
from uce_cli.families.base import EditableTensor, Family, Group, SingleFileLayout, TextPath
from uce_cli.paths import cache_folder
from uce_cli.weights.files import (
    PICKLE_SUFFIXES,  # noqa: F401 - re-exported for the writers
    is_pickle,
    load_pickle,
    read_header,
    read_json_config,
    refuse_pickle,
    sha256_file,
    weight_files,
)
from uce_cli.weights.hub import hub_snapshot
from uce_cli.weights.modelspec import is_hub_id

KVTensor = EditableTensor  # the name SD-era code and tests use for an editable tensor


@dataclass
class BaseModelFiles:
    """A diffusers pipeline folder opened for editing: its family, where everything is, nothing loaded."""

    spec: str
    revision: str | None
    root: Path
    denoiser: str
    denoiser_files: list[Path]
    kv: list[EditableTensor] = field(default_factory=list)  # every editable tensor, family order
    single_file: Path | None = None  # the single file this folder was converted from, if any
    family: Family | None = None

    @property
    def groups(self) -> tuple[Group, ...]:
        """The groups (embeddings the editable layers read) that have editable tensors."""
        assert self.family is not None
        present = {t.group for t in self.kv}
        return tuple(g for g in self.family.groups() if g.name in present)

    @property
    def width(self) -> int:
        """Width of the embeddings the editable layers read (d_in) — for a single-group family.

        Raises:
            ModelError: the family has several groups (ask ``groups`` instead).
        """
        widths = {t.group: t.part_width for t in self.kv}
        if len(widths) != 1:
            raise ModelError(
                f"{self.spec}: its editable layers read {len(widths)} embeddings "
                f"({', '.join(sorted(widths))}) — there is no single width"
            )
        return next(iter(widths.values()))

    def tensors_of(self, group: str) -> list[EditableTensor]:
        """The editable tensors of one group."""
        return [t for t in self.kv if t.group == group]

    def read_kv(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Read editable weights (all, or the given keys) from disk without loading anything else."""
        wanted = {t.key for t in self.kv} if keys is None else set(keys)
        out: dict[str, torch.Tensor] = {}
        for path in self.denoiser_files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key in wanted:
                        out[key] = f.get_tensor(key)
        return out


def resolve_model(spec: str, revision: str | None = None) -> Path:
    """Return a local diffusers folder for a model spec.

    ``builtin:tiny-sd`` / ``builtin:tiny-sdxl`` are built once into the cache; an existing folder is used as is; an
    ``owner/name`` hub id is downloaded (safetensors only) into the Hugging Face cache.

    Raises:
        ModelError: the path does not exist, or the hub download failed.
    """
    if spec.startswith("builtin:"):
        from uce_cli.weights.tiny import TINY_MODEL_NAME, ensure_tiny_model
        from uce_cli.weights.tiny_sdxl import TINY_SDXL_NAME, ensure_tiny_sdxl

        builders = {TINY_MODEL_NAME: ensure_tiny_model, TINY_SDXL_NAME: ensure_tiny_sdxl}
        if spec not in builders:
            raise ModelError(
                f"unknown builtin model '{spec}' — the builtin models are {', '.join(builders)}"
            )
        models = cache_folder("models")  # a clear error where the cache cannot hold it
        try:
            return builders[spec](models.parent)
        except (OSError, RuntimeError) as exc:
            raise ModelError(
                f"cannot build {spec} in the uce cache {models}: {exc} — set "
                "UCE_CACHE_DIR to a writable folder"
            ) from None
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelError(
                f"model '{spec}' is a file — give a diffusers pipeline folder or a hub id"
            )
        return path.resolve()
    if not is_hub_id(spec):
        raise ModelError(f"model path '{spec}' does not exist — check the path")
    return hub_snapshot(spec, revision)


def read_model_index(path: Path) -> dict:
    """A pipeline's model_index.json as a dict.

    Raises:
        ModelError: unreadable, not JSON, or not a JSON object.
    """
    return read_json_config(path)


def open_model(
    spec: str, revision: str | None = None, allow_pickle: bool = False
) -> BaseModelFiles:
    """Resolve a model, find its family and index its editable tensors (reads headers only).

    A single-file checkpoint is converted once into a cached diffusers folder; a pickle one
    (.ckpt/.pt/.bin) only with ``allow_pickle``, read with ``weights_only=True``.

    Raises:
        ModelError: not a diffusers folder, a family uce does not edit, pickle-only weights, or
            no editable layers.
    """
    if Path(spec).expanduser().is_file():
        return open_single_file(Path(spec).expanduser().resolve(), allow_pickle)
    root = resolve_model(spec, revision)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{root} is not a diffusers pipeline folder (no model_index.json) — give the folder "
            "that DiffusionPipeline.from_pretrained would load"
        )
    family = open_family(root, read_model_index(index_path))
    files = weight_files(root / family.denoiser, "diffusion_pytorch_model")
    tensors: list[EditableTensor] = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    found = family.group_of(key)
                    if found is None:
                        continue
                    sl = f.get_slice(key)
                    shape = tuple(sl.get_shape())
                    tensors.append(
                        EditableTensor(
                            key, found[0], path, (int(shape[0]), int(shape[1])), sl.get_dtype(),
                            found[1], family.columns_of(key),
                        )
                    )  # fmt: skip
        except Exception as exc:  # safetensors raises SafetensorError on a corrupt header
            raise ModelError(
                f"cannot read {path}: {exc} — the file is corrupt or not safetensors"
            ) from None
    if not tensors:
        raise ModelError(
            f"{root / family.denoiser} has no cross-attention layers (no tensor uce edits: "
            f"{family.edits}) — uce edits text-conditioned {family.denoiser}s"
        )
    check_editable_dtypes(tensors)
    for group in {t.group for t in tensors}:
        widths = {t.part_width for t in tensors if t.group == group}
        if len(widths) != 1:
            raise ModelError(
                f"cross-attention layers read embeddings of several widths {sorted(widths)}"
            )
    tensors.sort(key=lambda t: family.order(t.key))
    return BaseModelFiles(spec, revision, root, family.denoiser, files, tensors, family=family)


# safetensors dtypes uce edits in place. float8 is refused rather than edited in float32 and
# rounded back: with 3 mantissa bits (e4m3) the round trip alone moves a weight matrix by ~3 % of
# its norm (measured 2.6-3.3 % on the tiny models' and on Gaussian k/v weights), as much as or
# more than a typical edit's ‖ΔW‖/‖W‖ (the log's rel_delta), so the written edit would be mostly
# rounding noise — and its parity checks could not hold — without a word.
EDITABLE_DTYPES = ("F32", "F16", "BF16", "F64")


def check_editable_dtypes(tensors: list[EditableTensor]) -> None:
    """Refuse editable weights uce cannot edit faithfully: float8 and integer (quantized) dtypes.

    Raises:
        ModelError: naming the file, the tensor and its dtype.
    """
    for t in tensors:
        if t.dtype in EDITABLE_DTYPES:
            continue
        if t.dtype.startswith("F8"):
            why = (
                "float8 keeps 3 mantissa bits (a round trip moves a weight by ~3 %), so an edit "
                "written back in it would be mostly rounding — convert the weights to bf16 or fp16 first"
            )
        else:
            why = (
                "an integer or quantized weight cannot hold the edit without rounding it — give "
                "the floating-point weights"
            )
        raise ModelError(
            f"{t.file}: editable tensor {t.key} is stored as {t.dtype}; uce edits "
            f"{', '.join(EDITABLE_DTYPES)} weights only: {why}"
        )


def text_encoder_files(model: BaseModelFiles) -> list[Path]:
    """The text encoders' safetensors files (pickle-only folders are refused)."""
    assert model.family is not None
    return model.family.text_encoder_files()


def open_text_path(
    model: BaseModelFiles, device: torch.device | None, dtype: torch.dtype | None
) -> TextPath:
    """The model's text path: tokenizers, and with a device its encoders on it in ``dtype``."""
    assert model.family is not None
    return model.family.text_path(device, dtype)


def load_text_encoder(
    model: BaseModelFiles, device: torch.device, dtype: torch.dtype
) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and text encoder of a one-encoder family (SD 1.x/2.x), for encoding prompts.

    Raises:
        ModelError: the family reads more than one text encoder.
    """
    path = open_text_path(model, device, dtype)
    tokenizer, encoder = getattr(path, "tokenizer", None), getattr(path, "encoder", None)
    if tokenizer is None or encoder is None:
        assert model.family is not None
        raise ModelError(f"{model.spec}: {model.family.label} has no single tokenizer and encoder")
    return tokenizer, encoder


# --- single files: converted once into the cache, by their family's layout -------------------


def cached_diffusers_folder(
    path: Path, config_root: Path, cache: Path, layout: SingleFileLayout
) -> Path:
    """A diffusers copy of a single file in the cache, built once per file version.

    The key is the file's real path, size, modification time and header, plus the config folder:
    a patched copy (same header and size, other bytes) lives at another path, and a file rewritten
    in place gets a new modification time. The folder appears by atomic rename, so its presence
    means it is complete.
    """
    stat = path.stat()
    with path.open("rb") as fh:
        header = fh.read(int.from_bytes(fh.read(8), "little"))
    identity = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{config_root}|"
    digest = hashlib.sha256(identity.encode() + header).hexdigest()[:20]
    dest = cache / "single-file" / digest
    if (dest / "model_index.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{digest}.tmp-", dir=dest.parent))
    try:
        layout.convert(path, config_root, stage)
        os.replace(stage, dest)
    except OSError:
        shutil.rmtree(stage, ignore_errors=True)
        if not (dest / "model_index.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return dest


def _config_folder(spec: str) -> Path:
    """A folder with the pipeline's configs and tokenizer: builtin or local as is, a hub id without weights."""
    if spec.startswith("builtin:") or Path(spec).expanduser().is_dir():
        return resolve_model(spec)
    from huggingface_hub import snapshot_download

    from uce_cli.weights.hub import hub_unreachable

    try:
        return Path(
            snapshot_download(
                spec,
                allow_patterns=["model_index.json", "*/*.json", "*/*.txt", "tokenizer*/*"],
                # without network, the cache or one clear error, not 40 s of retries
                local_files_only=hub_unreachable() is not None,
            )
        )
    except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"cannot fetch the pipeline config '{spec}' this single file needs ({reason}) — connect "
            "once so it is cached, or convert the file to a diffusers folder"
        ) from None


def config_source(layout: SingleFileLayout, metadata: dict[str, str], keys: list[str]) -> str:
    """The pipeline config for a single file: the ``config`` it names (uce writes it), else its
    family layout's default."""
    named = metadata.get("config", "")
    if named.startswith("builtin:") or (named and Path(named).is_dir()):
        return named
    if named and re.match(r"^[\w.-]+/[\w.-]+$", named) and not Path(named).exists():
        return named
    return layout.config_source(keys)


def _pickle_copy(path: Path, cache: Path) -> Path:
    """A safetensors copy (in the cache, keyed by the file's sha256) of a pickle checkpoint."""
    dest = cache / "single-file" / f"pickle-{sha256_file(path)[:20]}.safetensors"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A fresh temporary file (O_EXCL) in the destination folder, then a rename: never a write
    # through a name someone else may have planted.
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(load_pickle(path), name, {"source": path.name})
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def open_single_file(path: Path, allow_pickle: bool = False) -> BaseModelFiles:
    """Open a single-file checkpoint for editing: its cached diffusers copy, remembering the file.

    The pipeline config (tokenizer, scheduler, component configs) comes from the ``config`` the file
    names in its metadata (uce's single-file output names its base), else the family's default.

    Raises:
        ModelError: no family's single-file layout, missing tensors, or a pickle without
            ``allow_pickle``.
    """
    if is_pickle(path):
        refuse_pickle(path, allow_pickle)
        path = _pickle_copy(path, cache_folder())
    elif path.suffix != ".safetensors":
        raise ModelError(
            f"model '{path}' is a file but not .safetensors — give a single-file checkpoint, a diffusers folder or a hub id"
        )
    keys, metadata = read_header(path)
    found = single_file_layout(keys)
    if found is None:
        raise ModelError(
            f"{path} has no 'model.diffusion_model.*' tensors of a layout uce reads — not a "
            "single-file Stable Diffusion checkpoint"
        )
    _, layout = found
    config = _config_folder(config_source(layout, metadata, keys))
    folder = cached_diffusers_folder(path, config, cache_folder(), layout)
    return dataclasses.replace(open_model(str(folder)), spec=str(path), single_file=path)


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available — use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("--device mps: MPS is not available — use --device cpu or auto")
    return torch.device(name)


DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(name: str, device: torch.device, cuda_auto: str = "fp16") -> torch.dtype:
    """Compute dtype: ``auto`` is ``cuda_auto`` (the family's: fp16, bf16 for T5/Gemma families)
    on CUDA, fp32 elsewhere."""
    if name not in DTYPES:
        raise ModelError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    chosen = DTYPES[name]
    if chosen is None:
        return DTYPES[cuda_auto] if device.type == "cuda" else torch.float32
    return chosen


def weight_dtype(name: str) -> torch.dtype:
    """safetensors dtype name → torch dtype."""
    table = {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F64": torch.float64,
    }
    return table[name]


def same_or_inside(child: Path, parent: Path) -> bool:
    """True when ``child`` is ``parent`` or lies inside it (after resolving links)."""
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents


def read_single_file_editable(path: Path) -> dict[str, torch.Tensor]:
    """Every editable tensor of a single-file checkpoint, under its diffusers denoiser name.

    Raises:
        ModelError: a corrupt file, or no family's single-file layout.
    """
    keys, _ = read_header(path)
    found = single_file_layout(keys)
    if found is None:
        raise ModelError(
            f"{path}: no 'model.diffusion_model.*' tensors of a layout uce reads — not a single-file checkpoint"
        )
    try:
        names = found[1].editable_names(keys)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(key) for key, name in names.items()}
