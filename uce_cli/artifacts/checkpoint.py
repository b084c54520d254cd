"""The single-file output: the model as one A1111/ComfyUI checkpoint, in its family's layout.

The output is a patched copy of the base's own single file when the edit ran on one (only the
edited tensors' bytes rewritten, same header), else the diffusers base written whole by the
family's layout (``Family.single_file()``); a family without one is refused for this format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from uce_cli.artifacts.outputs import patch_safetensors
from uce_cli.errors import EditFileError, OutputError
from uce_cli.families.model import BaseModelFiles
from uce_cli.weights.files import read_header
from uce_cli.weights.tensorfile import SavedFile


def write_single(
    path: Path, model: BaseModelFiles, new: dict[str, torch.Tensor], meta: dict[str, str]
) -> SavedFile | None:
    """A single file: a patched copy of the base's own single file, else the diffusers base converted.

    Returns:
        The digests of a converted file; None for a patched copy (it keeps the base's header).

    Raises:
        OutputError: the model's family has no single-file layout.
    """
    assert model.family is not None
    layout = model.family.single_file()
    if layout is None:
        raise OutputError(
            f"the single-file format has no layout for {model.family.label} — uce writes none for "
            "this family; use the diffusers, delta or LoRA format"
        )
    source = model.single_file
    if source is None:
        return layout.write(
            path,
            model.root,
            new,
            {**meta, "format": "uce-single-file", "config": meta.get("base_model", "")},
        )
    keys = read_header(source)[0]
    mapped = {layout.editable_key(key, keys): w for key, w in new.items()}
    patched = patch_safetensors(source, path, mapped)
    missing = sorted(set(mapped) - set(patched))
    if missing:
        raise EditFileError(
            f"{source}: tensor '{missing[0]}' is missing — the single file does not match its converted copy"
        )
    return None
