"""Writing an edit: a diffusers pipeline folder, a delta file, atomically, never over the base.

The diffusers output is the base folder with the denoiser's safetensors files copied and only
the edited tensors' bytes rewritten in place (same header, same offsets), so every other tensor
is bit-identical to the base. Everything is written into a hidden staging folder next to the
destination and renamed into place at the end: an interrupted run leaves no half-written output
(the rules for destinations, staging and recovery live in ``uce_cli.weights.destination``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from uce_cli.errors import OutputError
from uce_cli.families.model import BaseModelFiles
from uce_cli.safe_files import copy_file, copy_into, create_dir, open_new, write_file
from uce_cli.weights.destination import (  # noqa: F401  (the destination rules, re-exported for writers)
    EDIT_LOG_FILE,
    abandon_stage,
    check_destination,
    finalize,
    resolve_destination,
    staging_dir,
)
from uce_cli.weights.files import PICKLE_SUFFIXES, sha256_file
from uce_cli.weights.tensorfile import SavedFile, save_tensors

DELTA_FILE = "edit.safetensors"
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES, ".msgpack", ".h5", ".onnx")


class HashBook:
    """sha256 of files by identity (device, inode, size, mtime).

    A file hashed once — or a hard link to it, or a copy hashed while it was being written — is
    never read again for its hash: an SD 1.4 UNet is 3.4 GB, and hashing it costs seconds.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int], str] = {}

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int, int]:
        st = os.stat(path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def record(self, path: Path, digest: str) -> None:
        """Remember the hash of a file as it is now."""
        self._known[self._identity(path)] = digest

    def known(self, path: Path) -> str | None:
        """The file's sha256 if it costs nothing: seen before, or a Hugging Face cache blob
        (LFS blobs are named by their sha256, which the hub client verified on download)."""
        hit = self._known.get(self._identity(path))
        if hit is not None:
            return hit
        real = Path(os.path.realpath(path))
        if (
            real.parent.name == "blobs"
            and len(real.name) == 64
            and all(c in "0123456789abcdef" for c in real.name)
        ):
            return real.name
        return None

    def sha256(self, path: Path) -> str:
        """The file's sha256, computed only if it is not already known."""
        digest = self.known(path)
        if digest is None:
            digest = sha256_file(path)
            self.record(path, digest)
        return digest

    def sha256_many(self, paths: list[Path], workers: int = 2) -> dict[Path, str]:
        """Hashes of several files, the unknown ones computed in parallel (hashlib releases the
        GIL), largest first so the longest hash starts first."""
        order = sorted(paths, key=lambda p: os.stat(p).st_size, reverse=True)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = dict(zip(order, pool.map(self.sha256, order), strict=True))
        return {p: digests[p] for p in paths}


def tensor_digests(path: Path, keys: set[str] | None = None) -> dict[str, str]:
    """``key → "dtype|shape|sha256(bytes)"`` for the tensors of a safetensors file (all, or ``keys``).

    Read with plain sequential reads, not mmap, so hashing a 0.5 GB text encoder does not count
    against the process's resident memory.
    """
    data_start, header = _safetensors_layout(path)
    entries = sorted(
        (entry["data_offsets"], key, entry)
        for key, entry in header.items()
        if key != "__metadata__" and (keys is None or key in keys)
    )
    out: dict[str, str] = {}
    with path.open("rb") as f:
        for (begin, end), key, entry in entries:
            f.seek(data_start + begin)
            digest = hashlib.sha256()
            remaining = end - begin
            while remaining:
                block = f.read(min(remaining, 1 << 24))
                if not block:
                    raise OutputError(
                        f"{path}: truncated data for tensor {key} — the file is corrupt"
                    )
                digest.update(block)
                remaining -= len(block)
            out[key] = (
                f"{SAFETENSORS_DTYPES.get(entry['dtype'], entry['dtype'])}|{entry['shape']}|{digest.hexdigest()}"
            )
    return out


def digest_of(parts: dict[str, str]) -> str:
    """One sha256 over ``name|description`` lines in name order."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(f"{name}|{parts[name]}\n".encode())
    return digest.hexdigest()


# safetensors dtype names → the torch names content hashes have always used
SAFETENSORS_DTYPES = {
    "F64": "torch.float64",
    "F32": "torch.float32",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "I64": "torch.int64",
    "I32": "torch.int32",
    "I16": "torch.int16",
    "I8": "torch.int8",
    "U8": "torch.uint8",
    "BOOL": "torch.bool",
}


def _safetensors_layout(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # safetensors stores raw little-endian C-order bytes; view as uint8 keeps bf16/fp16 exact.
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def patch_safetensors(src: Path, dst: Path, new: dict[str, torch.Tensor]) -> list[str]:
    """Copy ``src`` to ``dst`` and overwrite the bytes of the tensors in ``new`` in place.

    The copy is the kernel's (``sendfile``: several times faster than copying through Python),
    into a new file (``uce_cli.safe_files``: never through a link); shapes and dtypes must match the file's, so the header and every offset stay the same
    and every other tensor is bit-identical.

    Returns:
        The keys patched.
    """
    data_start, header = _safetensors_layout(src)
    spans: list[tuple[int, bytes, str]] = []
    for key, tensor in new.items():
        entry = header.get(key)
        if entry is None:
            continue
        begin, end = entry["data_offsets"]
        payload = _tensor_bytes(tensor)
        if list(tensor.shape) != entry["shape"] or len(payload) != end - begin:
            raise OutputError(
                f"{key}: edited tensor {tuple(tensor.shape)} does not fit {src.name}'s "
                f"{tuple(entry['shape'])} {entry['dtype']} slot"
            )
        spans.append((data_start + begin, payload, key))
    with open_new(dst) as f:
        copy_into(src, f, dst)
        for offset, payload, _ in sorted(spans):
            f.seek(offset)
            f.write(payload)
    return [key for *_, key in spans]


def write_diffusers(
    stage: Path, model: BaseModelFiles, new: dict[str, torch.Tensor], hashes: HashBook | None = None
) -> list[Path]:
    """Write a complete diffusers pipeline folder in which only ``new`` tensors differ from the base.

    Files of the component folders listed in model_index.json are copied; the denoiser folder
    receives its
    config and the patched safetensors files only (a stale fp16/.bin copy of the unedited weights
    would otherwise load silently); weight files at the top level are not copied.

    Args:
        stage: the staging folder.
        model: the base model.
        new: edited tensors by denoiser key.
        hashes: learns the hash of each unchanged copy whose source's hash it already knows.

    Returns:
        The written files, relative to ``stage``.
    """
    root = model.root
    index = json.loads((root / "model_index.json").read_text())
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    written: list[Path] = []
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or src.is_dir():
            continue
        top = rel.parts[0]
        if len(rel.parts) == 1:
            if src.suffix in WEIGHT_SUFFIXES:
                continue
        elif top not in components:
            continue
        elif top == model.denoiser and (
            src.suffix in WEIGHT_SUFFIXES or ".safetensors" in src.name
        ):
            if src not in model.denoiser_files and not src.name.endswith(".index.json"):
                continue
        dst = stage / rel
        # A copy, never a hard link: rewriting an output file in place must not touch the base.
        if src in model.denoiser_files:
            create_dir(dst.parent, stage)
            patch_safetensors(src, dst, new)
        else:
            copy_file(src, dst, stage)
            if hashes is not None and (digest := hashes.known(src)) is not None:
                hashes.record(dst, digest)  # an unchanged copy has its source's hash
        written.append(rel)
    return written


def write_delta(path: Path, new: dict[str, torch.Tensor], metadata: dict[str, str]) -> SavedFile:
    """Write only the edited tensors (keys prefixed by the component, e.g. ``unet.``) and metadata.

    Byte-reproducible (sorted metadata, fixed tensor order): see ``uce_cli.weights.tensorfile``.
    """
    return save_tensors(new, path, metadata)


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically, never through a link (``uce_cli.safe_files``)."""
    write_file(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
