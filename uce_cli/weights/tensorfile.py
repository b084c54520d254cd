"""Writing safetensors files reproducibly: the same tensors and metadata give the same bytes.

safetensors' own ``save_file`` keeps the metadata in a Rust hash map whose order changes from one
process to the next, so two identical runs wrote files that differed in their header. Here the
header is built in Python: ``__metadata__`` first with its keys sorted, then the tensors in a fixed
order (larger element size first, then by name, so every tensor starts aligned to its element
size, as safetensors itself lays them out). The file is an ordinary safetensors file (loaded by
``safetensors``, diffusers, A1111) and is created with the usual permissions (0666 less the umask).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from uce_cli.safe_files import open_new

# torch dtype → safetensors dtype name (the ones uce writes: weights, factors, K, alphas).
DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class SavedFile:
    """Digests of a file written by ``save_tensors``.

    ``sha256`` covers every byte of the file; ``content_sha256`` covers the tensors only (names,
    dtypes, shapes and bytes, not the metadata), so it does not change with metadata that names
    host paths or versions.
    """

    sha256: str
    content_sha256: str


def _sha256(parts: Iterable[bytes | memoryview]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # raw little-endian C-order bytes; a uint8 view keeps bf16/fp16 exact and costs no copy
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> SavedFile:
    """Write ``tensors`` and string ``metadata`` to ``path`` as a byte-reproducible safetensors file.

    Raises:
        TypeError: a metadata value that is not a string, or a dtype safetensors cannot hold.
    """
    items = []
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name}: dtype {t.dtype} cannot be written to safetensors")
        items.append((name, t))
    items.sort(key=lambda item: (-item[1].element_size(), item[0]))
    index: dict[str, dict] = {}
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        index[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header: dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise TypeError(f"metadata {key!r} is {type(value).__name__}, not a string")
        header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
    header.update(index)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    data = [_tensor_bytes(t) for _, t in items if t.numel()]
    whole = hashlib.sha256(struct.pack("<Q", len(raw)) + raw)
    # The tensors-only digest runs beside the write and the whole-file digest (hashlib and file
    # writes release the GIL on large buffers).
    with ThreadPoolExecutor(max_workers=1) as pool:
        content = pool.submit(_sha256, [json.dumps(index, separators=(",", ":")).encode(), *data])
        with open_new(Path(path)) as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for view in data:
                f.write(view)
                whole.update(view)
        return SavedFile(whole.hexdigest(), content.result())
