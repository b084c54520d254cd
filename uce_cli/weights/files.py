"""Weight files on disk: a component's safetensors files, their headers, and pickle files read safely.

This is the bottom of uce's weight I/O: families, the model opener and the formats all read
weights through it, and it imports nothing of uce but the errors. Safetensors metadata is only
ever read as data. Pickle files run code when unpickled, so they are refused unless the user
passes ``--allow-pickle``, and even then are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from uce_cli.errors import EditFileError, ModelError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one component (single file or sharded via an index).

    Raises:
        ModelError: only pickle weights, or no weights at all, naming the folder.
    """
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return index_shards(index)
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


def index_shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's ``*.safetensors.index.json`` names, checked.

    This is the one reader of index files: every family, the denoiser and the text encoders alike,
    finds its shards through it, so a broken index is refused the same way everywhere.

    Raises:
        ModelError: the index is unreadable or not JSON, has no ``weight_map`` object, maps a key
            to something other than a shard file name in the index's folder, or names a shard
            that is missing — one line naming the index and what is wrong.
    """
    fix = "re-download the component or repair the index"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{index} is not valid JSON ({reason}) — {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = (
            f"a JSON {type(data).__name__}"
            if not isinstance(data, dict)
            else "no 'weight_map'"
            if "weight_map" not in data
            else f"a 'weight_map' that is a {type(weight_map).__name__}"
            if not isinstance(weight_map, dict)
            else "an empty 'weight_map'"
        )
        raise ModelError(
            f"{index} holds {found}, not a 'weight_map' object of tensor name → shard file — {fix}"
        )
    shards: set[str] = set()
    for key, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or not shard.endswith(".safetensors")
            or Path(shard).name != shard
            or shard.startswith(".")
        ):
            raise ModelError(
                f"{index}: weight_map[{str(key)[:80]!r}] is {str(shard)[:80]!r}, not the name of a "
                f".safetensors shard in {index.parent} — {fix}"
            )
        shards.add(shard)
    for shard in sorted(shards):
        if not (index.parent / shard).is_file():
            raise ModelError(f"{index} names the shard {shard}, which is missing — {fix}")
    return [index.parent / s for s in sorted(shards)]


def check_indexes(folder: Path) -> None:
    """Read every ``*.safetensors.index.json`` in a component folder (``index_shards``), so a
    broken index is refused before any library reads it.

    Raises:
        ModelError: the first broken index, named.
    """
    for index in sorted(folder.glob("*.safetensors.index.json")):
        index_shards(index)


def read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """(tensor keys, metadata) of a safetensors file, with a clear error for a corrupt file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError: both mean "cannot use this file"
        raise ModelError(
            f"cannot read {path}: {exc} — the file is corrupt or not safetensors"
        ) from None


def read_json_config(path: Path) -> dict:
    """A component's config.json (or a model_index.json) as a dict.

    Raises:
        ModelError: unreadable, not JSON, or not a JSON object.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"{path} is not valid JSON ({exc}) — is this a diffusers folder?"
        ) from None
    if not isinstance(config, dict):
        raise ModelError(
            f"{path} holds a JSON {type(config).__name__}, not an object — a diffusers "
            "model_index.json maps component names to their classes"
        )
    return config


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def is_pickle(path: Path) -> bool:
    """True for the file suffixes that hold Python pickles."""
    return path.suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """Raise unless pickle loading was allowed explicitly.

    Raises:
        EditFileError: naming the file and the flag that allows it.
    """
    if is_pickle(path) and not allow_pickle:
        raise EditFileError(
            f"{path} is a pickle file, and unpickling can run arbitrary code — convert it to "
            ".safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint's tensors, via ``torch.load(weights_only=True)``; A1111's ``state_dict`` nesting is unwrapped.

    Raises:
        EditFileError: the file cannot be unpickled safely, or holds no tensors.
    """
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError: all mean "not usable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EditFileError(
            f"cannot load {path} with weights_only=True ({reason}) — the file is corrupt or not a checkpoint"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise EditFileError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EditFileError(f"{path} holds no tensors")
    # Tensors unpickled from one file may share storage; cloning makes each safe to save alone.
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}
