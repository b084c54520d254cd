"""The base model: resolve a model spec to a diffusers folder and find its cross-attention k/v tensors.

The denoiser is never instantiated: its k/v tensors are read lazily from the safetensors files
(``safe_open``), so opening SD 1.4 costs the text encoder plus 19 M parameters, not 3.3 GB.
Only safetensors weights are read; pickle files are refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from uce_cli.errors import ModelError
from uce_cli.hub import hub_snapshot
from uce_cli.modelspec import is_hub_id
from uce_cli.paths import cache_folder

# Cross-attention blocks of diffusers' transformer blocks: attn2 reads the text embeddings.
CROSS_ATTN_KEY = re.compile(r"^(?P<block>.*\.attn2)\.(?P<proj>to_k|to_v)\.weight$")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DENOISER = "unet"
# Pipeline families uce does not edit yet, by the prefix of their model_index.json _class_name.
FAMILIES = (
    ("StableDiffusionXL", "SDXL"),
    ("StableDiffusion3", "Stable Diffusion 3"),
    ("PixArt", "PixArt"),
    ("Flux", "FLUX"),
    ("HiDream", "HiDream"),
    ("Kandinsky", "Kandinsky"),
    ("IF", "DeepFloyd IF"),
)
# Components an SD 1.x/2.x pipeline does not have: a second text encoder, or a transformer denoiser.
EXTRA_COMPONENTS = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3", "transformer")


@dataclass(frozen=True)
class KVTensor:
    """One cross-attention projection weight inside a safetensors file."""

    key: str  # name inside the denoiser, e.g. down_blocks.0.attentions.0....attn2.to_k.weight
    file: Path
    shape: tuple[int, int]  # (d_out, d_in)
    dtype: str  # safetensors dtype name, e.g. F32


@dataclass
class BaseModelFiles:
    """A diffusers pipeline folder opened for editing: where everything is, nothing loaded yet."""

    spec: str
    revision: str | None
    root: Path
    denoiser: str
    denoiser_files: list[Path]
    kv: list[KVTensor] = field(default_factory=list)
    single_file: Path | None = None  # the LDM single file this folder was converted from, if any

    @property
    def width(self) -> int:
        """Width of the text embeddings the cross-attention layers read (d_in)."""
        return self.kv[0].shape[1]

    def read_kv(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Read k/v weights (all, or the given keys) from disk without loading anything else."""
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

    ``builtin:tiny-sd`` is built once into the cache; an existing folder is used as is; an
    ``owner/name`` hub id is downloaded (safetensors only) into the Hugging Face cache.

    Raises:
        ModelError: the path does not exist, or the hub download failed.
    """
    if spec.startswith("builtin:"):
        from uce_cli.tiny import TINY_MODEL_NAME, ensure_tiny_model

        if spec != TINY_MODEL_NAME:
            raise ModelError(
                f"unknown builtin model '{spec}' — the builtin model is {TINY_MODEL_NAME}"
            )
        models = cache_folder("models")  # a clear error where the cache cannot hold it
        try:
            return ensure_tiny_model(models.parent)
        except (OSError, RuntimeError) as exc:
            raise ModelError(
                f"cannot build {TINY_MODEL_NAME} in the uce cache {models}: {exc} — set "
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


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one component (single file or sharded via an index)."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelError(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles))}); uce reads "
            "safetensors only, since unpickling runs code — convert them to .safetensors"
        )
    raise ModelError(f"{folder} has no {stem}.safetensors — is this a complete diffusers folder?")


def read_model_index(path: Path) -> dict:
    """A pipeline's model_index.json as a dict.

    Raises:
        ModelError: unreadable, not JSON, or not a JSON object.
    """
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"{path} is not valid JSON ({exc}) — is this a diffusers folder?"
        ) from None
    if not isinstance(index, dict):
        raise ModelError(
            f"{path} holds a JSON {type(index).__name__}, not an object — a diffusers "
            "model_index.json maps component names to their classes"
        )
    return index


def check_family(index: dict, root: Path) -> None:
    """Refuse pipelines uce does not edit, naming their family: only SD 1.x/2.x-shaped ones pass.

    Raises:
        ModelError: another family (SDXL, SD 3, PixArt, FLUX, …), a second text encoder or a
            transformer denoiser, or a text encoder other than CLIP.
    """
    supported = "uce edits Stable Diffusion 1.x/2.x pipelines (a UNet and one CLIP text encoder)"
    class_name = str(index.get("_class_name") or "")
    family = next((f for prefix, f in FAMILIES if class_name.startswith(prefix)), None)
    if family is not None:
        raise ModelError(f"{root}: {class_name} ({family}) is not supported yet — {supported}")
    extra = [name for name in EXTRA_COMPONENTS if name in index]
    if extra:
        kind = "a transformer" if extra == ["transformer"] else "two text encoders"
        raise ModelError(
            f"{root}: a pipeline with {kind} ({', '.join(extra)}) is not supported yet — "
            f"{supported}"
        )
    for component in (DENOISER, "text_encoder", "tokenizer"):
        if component not in index:
            raise ModelError(f"{root} has no '{component}' component — {supported}")
    encoder = index["text_encoder"]
    if isinstance(encoder, list) and len(encoder) == 2 and encoder[1] != "CLIPTextModel":
        raise ModelError(
            f"{root}: its text encoder is a {encoder[1]}, not a CLIPTextModel — {supported}"
        )


def open_model(
    spec: str, revision: str | None = None, allow_pickle: bool = False
) -> BaseModelFiles:
    """Resolve a model and index its cross-attention k/v tensors (reads headers only).

    A single-file checkpoint (LDM key names) is converted once into a cached diffusers folder;
    a pickle one (.ckpt/.pt/.bin) only with ``allow_pickle``, read with ``weights_only=True``.

    Raises:
        ModelError: not a diffusers folder, pickle-only weights, or no cross-attention layers.
    """
    if Path(spec).expanduser().is_file():
        from uce_cli.formats.checkpoint import open_single_file

        return open_single_file(Path(spec).expanduser().resolve(), allow_pickle)
    root = resolve_model(spec, revision)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{root} is not a diffusers pipeline folder (no model_index.json) — give the folder "
            "that DiffusionPipeline.from_pretrained would load"
        )
    index = read_model_index(index_path)
    check_family(index, root)
    files = _weight_files(root / DENOISER, "diffusion_pytorch_model")
    kv: list[KVTensor] = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    if CROSS_ATTN_KEY.match(key):
                        sl = f.get_slice(key)
                        shape = tuple(sl.get_shape())
                        kv.append(
                            KVTensor(key, path, (int(shape[0]), int(shape[1])), sl.get_dtype())
                        )
        except Exception as exc:  # safetensors raises SafetensorError on a corrupt header
            raise ModelError(
                f"cannot read {path}: {exc} — the file is corrupt or not safetensors"
            ) from None
    if not kv:
        raise ModelError(
            f"{root / DENOISER} has no cross-attention layers (no '*.attn2.to_k.weight' / "
            "'*.attn2.to_v.weight' tensors) — uce edits text-conditioned UNets"
        )
    widths = {t.shape[1] for t in kv}
    if len(widths) != 1:
        raise ModelError(
            f"cross-attention layers read embeddings of several widths {sorted(widths)}"
        )
    kv.sort(key=lambda t: _block_order(t.key))
    return BaseModelFiles(spec, revision, root, DENOISER, files, kv)


def _block_order(key: str) -> tuple:
    # down → mid → up, then numerically, so tables read in the UNet's order.
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(key.split(".")[0], 3)
    return (part, [int(x) if x.isdigit() else x for x in key.split(".")])


def text_encoder_files(model: BaseModelFiles) -> list[Path]:
    """The text encoder's safetensors files (pickle-only folders are refused)."""
    return _weight_files(model.root / "text_encoder", "model")


def load_text_encoder(
    model: BaseModelFiles, device: torch.device, dtype: torch.dtype
) -> tuple[object, torch.nn.Module]:
    """Load the tokenizer and the text encoder (safetensors only) for encoding prompts."""
    from transformers import AutoTokenizer, CLIPTextModel

    tok_dir = model.root / "tokenizer"
    enc_dir = model.root / "text_encoder"
    _weight_files(enc_dir, "model")  # refuses pickle-only folders with a clear message
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        encoder = CLIPTextModel.from_pretrained(str(enc_dir), use_safetensors=True, dtype=dtype)
    except Exception as exc:  # transformers raises OSError/ValueError/etc. on broken folders
        raise ModelError(f"cannot load the text encoder from {model.root}: {exc}") from exc
    hidden = encoder.config.hidden_size
    if hidden != model.width:
        raise ModelError(
            f"the text encoder's width {hidden} differs from the cross-attention width "
            f"{model.width} — this pipeline conditions the UNet on something uce does not model"
        )
    encoder.to(device).eval().requires_grad_(False)
    return tokenizer, encoder


def load_tokenizer(model_root: Path) -> object:
    """Only the tokenizer (no weights): enough to count tokens for ``--dry-run``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_root / "tokenizer"))


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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Text-encoder compute dtype: ``auto`` is fp16 on CUDA, fp32 elsewhere."""
    if name not in DTYPES:
        raise ModelError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
    chosen = DTYPES[name]
    if chosen is None:
        return torch.float16 if device.type == "cuda" else torch.float32
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
