"""``uce merge`` and ``uce transfer`` as library calls: an existing edit applied to a base, written atomically.

Both end in the same place as ``uce apply``: a staging folder with the requested formats and an
``edit_log.json`` (here without residual/drift figures, which need the prompts' statistics), renamed
into place. The base model is never modified.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from uce_cli.editlog import build_edit_log
from uce_cli.formats import Edit, EditFileError, edit_weights, load_edit, write_formats
from uce_cli.formats.files import text_encoder_weights_sha256
from uce_cli.formats.operator import OPERATOR_FILE
from uce_cli.model import BaseModelFiles, open_model
from uce_cli.outputs import (
    EDIT_LOG_FILE,
    check_destination,
    finalize,
    sha256_file,
    staging_dir,
    write_json,
)

# Fields of an edit file's metadata that describe the edit itself and travel to the new files.
_CARRIED = ("recipe_sha256", "alignment", "recipe", "base_model", "base_revision")


def _edit_summary(edit: Edit) -> dict[str, Any]:
    meta = {k: v for k, v in edit.metadata.items() if k != "recipe"}
    return {
        "path": str(edit.path),
        "kind": edit.kind,
        "sha256": sha256_file(edit.path),
        "metadata": meta,
    }


def write_edit(
    base: BaseModelFiles,
    out: Path,
    formats: list[str],
    new: dict[str, torch.Tensor],
    source: Edit,
    command: str,
    force: bool = False,
    lora_rank: int | None = None,
) -> dict[str, Any]:
    """Write ``new`` k/v weights of ``base`` in ``formats`` to ``out`` with an edit log.

    Returns:
        A summary: out, formats, layers, outputs (file → sha256).
    """
    check_destination(out, base.root, force)
    old = base.read_kv(list(new))
    meta = {k: source.metadata[k] for k in _CARRIED if k in source.metadata}
    meta["uce_version"] = build_edit_log()["versions"]["uce"]
    meta["base_model"] = base.spec  # the files now belong to this base
    meta["base_revision"] = base.revision or ""
    op = source.operator
    stage = staging_dir(out)
    try:
        written = write_formats(
            stage,
            base,
            formats,
            old,
            new,
            meta,
            k=op.k if op is not None else None,
            projections=op.projections if op is not None else None,
            lora_rank=lora_rank,
        )
        layers: dict[str, dict[str, Any]] = {}
        for key, w in new.items():
            w0 = old[key].to(torch.float64)
            name = f"{base.denoiser}.{key}"
            layers[name] = {
                "shape": list(w.shape),
                "rel_delta": float((w.to(torch.float64) - w0).norm() / w0.norm().clamp_min(1e-300)),
                **written.layers.get(name, {}),
            }
        recipe = source.metadata.get("recipe")
        log = build_edit_log(
            command=command,
            edit=_edit_summary(source),
            recipe_sha256=source.metadata.get("recipe_sha256"),
            recipe=json.loads(recipe) if recipe else None,
            base_model={
                "spec": base.spec,
                "revision": base.revision,
                "path": str(base.root),
                "text_encoder_weights_sha256": text_encoder_weights_sha256(base.root),
            },
            layers=layers,
            outputs={str(f): sha256_file(stage / f) for f in written.files},
        )
        write_json(stage / EDIT_LOG_FILE, log)
        finalize(stage, out, force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {"out": str(out), "formats": formats, "layers": len(layers), "outputs": log["outputs"]}


def run_merge(
    base_spec: str,
    edit_path: Path,
    out: Path,
    formats: list[str],
    force: bool = False,
    lora_rank: int | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Apply a delta, LoRA or operator file to a base model and write the result.

    Raises:
        UceError: a wrong base (missing key, shape or text-encoder mismatch), a bad file, a bad output.
    """
    out = Path(out).expanduser().resolve()
    check_destination(out, None, force)
    base = open_model(base_spec, allow_pickle=allow_pickle)
    edit = load_edit(edit_path, allow_pickle)
    if edit.kind == "model":
        raise EditFileError(
            f"{edit_path} is a whole model, not an edit — merge takes a delta, LoRA or operator file"
        )
    new = edit_weights(edit, base)
    return write_edit(base, out, formats, new, edit, "merge", force, lora_rank)


def run_transfer(
    operator_path: Path,
    model_spec: str,
    out: Path,
    formats: list[str],
    force: bool = False,
    lora_rank: int | None = None,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Re-apply an edit operator to another model that shares its text encoder (W_new = W_old·K).

    Raises:
        EditFileError: not an operator, or the model's text encoder differs from the operator's.
    """
    out = Path(out).expanduser().resolve()
    check_destination(out, None, force)
    operator_path = Path(operator_path).expanduser()
    if operator_path.is_dir() and (operator_path / OPERATOR_FILE).is_file():
        operator_path = operator_path / OPERATOR_FILE  # an output folder of `uce apply`
    edit = load_edit(operator_path, allow_pickle)
    if edit.kind != "operator" and edit.metadata.get("edit_form") == "per-layer":
        raise EditFileError(
            f"{operator_path} has norm-relative debias targets (alpha_scale: relative), solved per "
            "layer: it is not W_new = W_old·K and cannot be transferred — run the recipe on the "
            "other model instead (or use alpha_scale: absolute)"
        )
    if edit.kind != "operator":
        raise EditFileError(
            f"{operator_path} is a {edit.kind}, not an operator — write one with `uce apply --format operator`"
            + (
                " (a delta or LoRA applies to its own base: use `uce merge`)"
                if edit.kind != "model"
                else ""
            )
        )
    base = open_model(model_spec, allow_pickle=allow_pickle)
    new = edit_weights(edit, base)
    return write_edit(base, out, formats, new, edit, "transfer", force, lora_rank)
