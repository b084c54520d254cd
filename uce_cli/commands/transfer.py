"""``uce merge`` and ``uce transfer`` as library calls: an existing edit applied to a base, written atomically.

Both end in the same place as ``uce apply``: a staging folder with the requested formats and an
``edit_log.json`` (here without residual/drift figures, which need the prompts' statistics), renamed
into place. The base model is never modified.

A delta holds absolute k/v tensors, so it belongs to the base it was made for: its metadata
records that base's k/v content hash (``base_kv_weights_sha256``), and ``uce merge`` refuses a
delta whose hash differs from the target's (``--allow-other-base`` overrides), pointing to
``uce transfer`` with the edit's operator, which gives the exact edit on any base sharing the text
encoder. A delta without the hash (older uce, other tools) is merged with a warning that it could
not be checked. A LoRA is a difference, meant to be applied to other checkpoints: one made for
another base is applied, with a warning. Operators are exact everywhere (their text-encoder hash
is checked).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from uce_cli.artifacts.editlog import build_edit_log, output_fingerprint
from uce_cli.artifacts.files import kv_weights_sha256, text_encoder_weights_sha256
from uce_cli.artifacts.formats import Edit, EditFileError, edit_weights, load_edit, write_formats
from uce_cli.artifacts.operator import OPERATOR_FILE
from uce_cli.artifacts.outputs import (
    EDIT_LOG_FILE,
    HashBook,
    abandon_stage,
    check_destination,
    finalize,
    resolve_destination,
    sha256_file,
    staging_dir,
    write_json,
)
from uce_cli.errors import UceWarning
from uce_cli.families.model import BaseModelFiles, open_model

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
        A summary: out, formats, layers, outputs (file → sha256), fingerprint.
    """
    check_destination(out, base.root, force, inputs=[source.path])
    old = base.read_kv(list(new))
    meta = {k: source.metadata[k] for k in _CARRIED if k in source.metadata}
    meta["uce_version"] = build_edit_log()["versions"]["uce"]
    meta["base_model"] = base.spec  # the files now belong to this base
    meta["base_revision"] = base.revision or ""
    meta["base_kv_weights_sha256"] = kv_weights_sha256(base, list(new))
    op = source.operator
    hashes = HashBook()
    stage = staging_dir(out)
    try:
        written = write_formats(
            stage,
            base,
            formats,
            old,
            new,
            meta,
            k=op.ks if op is not None else None,
            projections=op.projections if op is not None else None,
            lora_rank=lora_rank,
            hashes=hashes,
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
        outputs = dict(
            zip(
                map(str, written.files),
                hashes.sha256_many([stage / f for f in written.files]).values(),
                strict=True,
            )
        )
        log = build_edit_log(
            fingerprint=output_fingerprint(
                source.metadata.get("recipe_sha256"),
                {**outputs, **{str(f): d for f, d in written.content.items()}},
            ),
            command=command,
            edit=_edit_summary(source),
            recipe_sha256=source.metadata.get("recipe_sha256"),
            recipe=json.loads(recipe) if recipe else None,
            base_model={
                "spec": base.spec,
                "revision": base.revision,
                "path": str(base.root),
                "text_encoder_weights_sha256": text_encoder_weights_sha256(base.root, base.family),
                "kv_weights_sha256": meta["base_kv_weights_sha256"],
            },
            layers=layers,
            outputs=outputs,
        )
        write_json(stage / EDIT_LOG_FILE, log)
        finalize(stage, out, force)
    except BaseException as exc:
        abandon_stage(stage, out, exc)  # deletes the stage; raises an OSError as an OutputError
        raise
    return {
        "out": str(out),
        "formats": formats,
        "layers": len(layers),
        "outputs": log["outputs"],
        "fingerprint": log["fingerprint"],
    }


def check_edit_base(edit: Edit, base: BaseModelFiles, keys: list[str], allow_other: bool) -> None:
    """Refuse a delta made for another base; warn for a LoRA made for one (module docstring).

    Args:
        edit: the delta, LoRA or operator being merged.
        base: the model it is merged into.
        keys: the k/v keys the edit writes.
        allow_other: ``--allow-other-base``: merge a delta of another base, with a warning.

    Raises:
        EditFileError: a delta whose recorded base k/v hash differs from ``base``'s.
    """
    if edit.kind not in ("delta", "lora"):
        return
    recorded = edit.metadata.get("base_kv_weights_sha256", "")
    transfer = (
        f"`uce transfer OPERATOR --model {base.spec}` with the edit's operator.safetensors "
        "(uce apply --format operator) gives the exact edit"
    )
    if not recorded:
        if edit.kind == "delta":
            warnings.warn(
                f"{edit.path} does not record which base it was made for (no "
                f"base_kv_weights_sha256: an older uce or another tool), so it cannot be checked "
                f"against {base.spec}; if it was made for another base, this replaces that "
                f"model's own k/v weights — {transfer}",
                UceWarning,
                stacklevel=2,
            )
        return
    actual = kv_weights_sha256(base, keys)
    if recorded == actual:
        return
    differs = (
        f"{edit.path} was made for another base (base_kv_weights_sha256 {recorded[:12]}…; "
        f"{base.spec}'s k/v weights hash to {actual[:12]}…)"
    )
    if edit.kind == "lora":
        warnings.warn(f"{differs}: applied as a difference; {transfer}", UceWarning, stacklevel=2)
    elif allow_other:
        warnings.warn(
            f"{differs}: merged anyway (--allow-other-base) — the result carries that base's "
            f"edited k/v weights, not {base.spec}'s own; {transfer}",
            UceWarning,
            stacklevel=2,
        )
    else:
        raise EditFileError(
            f"{differs} — a delta holds absolute k/v weights, so merging it would replace this "
            f"model's own k/v with the other base's edited ones; {transfer}, or pass "
            "--allow-other-base to merge it anyway"
        )


def run_merge(
    base_spec: str,
    edit_path: Path,
    out: Path,
    formats: list[str],
    force: bool = False,
    lora_rank: int | None = None,
    allow_pickle: bool = False,
    allow_other_base: bool = False,
) -> dict[str, Any]:
    """Apply a delta, LoRA or operator file to a base model and write the result.

    Args:
        allow_other_base: merge a delta made for another base (``check_edit_base``).

    Raises:
        UceError: a wrong base (missing key, shape, text-encoder or k/v hash mismatch), a bad or
            non-finite file, a bad output.
    """
    out = resolve_destination(out)
    check_destination(out, None, force, inputs=[Path(edit_path)])
    base = open_model(base_spec, allow_pickle=allow_pickle)
    edit = load_edit(edit_path, allow_pickle)
    if edit.kind == "model":
        raise EditFileError(
            f"{edit_path} is a whole model, not an edit — merge takes a delta, LoRA or operator file"
        )
    new = edit_weights(edit, base)
    check_edit_base(edit, base, list(new), allow_other_base)
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
    out = resolve_destination(out)
    check_destination(out, None, force, inputs=[Path(operator_path)])
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
