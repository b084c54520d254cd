"""Edit artifacts: write an edit in any output format, and read any of them back as new k/v weights.

Formats (``output.formats`` / ``--format``):

| name          | file(s)                              | holds                                         |
| ------------- | ------------------------------------ | --------------------------------------------- |
| diffusers     | the pipeline folder                  | the full model, edited k/v patched in place   |
| delta         | ``edit.safetensors``                 | edited tensors only (``unet.<key>``)          |
| lora          | ``pytorch_lora_weights.safetensors`` | exact/truncated ΔW factors, diffusers layout  |
| lora-kohya    | ``lora_kohya.safetensors``           | the same factors, kohya/A1111 layout          |
| single-file   | ``model.safetensors``                | the full model with LDM key names             |
| operator      | ``operator.safetensors``             | K (d_in × d_in, float64)                      |
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uce_cli.artifacts.checkpoint import write_single
from uce_cli.artifacts.files import (
    EditFileError,
    check_finite,
    is_pickle,
    kv_files,
    read_metadata,
    read_tensors,
    refuse_pickle,
    text_encoder_weights_sha256,
)
from uce_cli.artifacts.lora import (
    KOHYA_FILE,
    LORA_FILE,
    LoraFactors,
    check_rank,
    factor_operator,
    factorize_delta,
    is_lora,
    lora_state_dict,
    operator_lora_factors,
    read_lora_deltas,
)
from uce_cli.artifacts.operator import (
    OPERATOR_FILE,
    Operator,
    check_operator_base,
    operator_weights,
    read_operator,
    write_operator,
)
from uce_cli.artifacts.outputs import DELTA_FILE, HashBook, write_delta, write_diffusers
from uce_cli.edit.plan import EditPlan
from uce_cli.edit.recipe import OUTPUT_FORMATS
from uce_cli.edit.solve import check_base_weights, check_result
from uce_cli.families import single_file_layout
from uce_cli.families.base import Family
from uce_cli.families.model import (
    BaseModelFiles,
    open_model,
    read_single_file_editable,
    weight_dtype,
)
from uce_cli.weights.tensorfile import SavedFile, save_tensors

FORMATS = OUTPUT_FORMATS  # one list of names, kept by the recipe schema
FORMAT_FILES = {
    "delta": DELTA_FILE,
    "lora": LORA_FILE,
    "lora-kohya": KOHYA_FILE,
    "operator": OPERATOR_FILE,
}
SINGLE_FILE = "model.safetensors"
DENOISERS = ("unet", "transformer")  # the components editable tensors live in
# Where a folder holds several edit files, the most exact one answers for it.
_FOLDER_ORDER = (DELTA_FILE, SINGLE_FILE, OPERATOR_FILE, LORA_FILE, KOHYA_FILE)

__all__ = [
    "FORMATS",
    "Edit",
    "EditFileError",
    "Written",
    "check_formats",
    "edit_metadata",
    "edit_weights",
    "load_edit",
    "text_encoder_weights_sha256",
    "write_formats",
]


def edit_metadata(plan: EditPlan) -> dict[str, str]:
    """Header metadata of an edit's files: base, recipe (hash and normalized JSON), alignment, version."""
    from uce_cli import __version__

    return {
        "uce_version": __version__,
        "base_model": plan.model,
        "base_revision": plan.revision or "",
        "recipe_sha256": plan.recipe_sha256,
        "alignment": plan.alignment,
        "recipe": json.dumps(plan.recipe, sort_keys=True),
    }


def check_formats(formats: list[str]) -> list[str]:
    """Deduplicated formats, refusing an unknown name.

    Raises:
        EditFileError: naming the unknown format and the known ones.
    """
    for name in formats:
        if name not in FORMATS:
            raise EditFileError(f"unknown format '{name}' — choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


@dataclass
class Written:
    """What ``write_formats`` wrote: files relative to the stage, and per-layer LoRA figures.

    ``content`` holds, for each file uce serialized itself (delta, LoRA, operator, a converted
    single file), the sha256 of its tensors without the metadata (``SavedFile.content_sha256``);
    the other files (a diffusers folder, a patched single file) carry the base's own headers.
    """

    files: list[Path] = field(default_factory=list)
    layers: dict[str, dict[str, float | int]] = field(default_factory=dict)
    content: dict[Path, str] = field(default_factory=dict)

    def add(self, stage: Path, name: str, saved: SavedFile | None, hashes: HashBook | None) -> None:
        """Record one written file (and its digests, which spares hashing it again)."""
        self.files.append(Path(name))
        if saved is not None:
            self.content[Path(name)] = saved.content_sha256
            if hashes is not None:
                hashes.record(stage / name, saved.sha256)


def refuse_formats(family: Family, formats: list[str], keys: list[str]) -> None:
    """Refuse the formats a family has no loadable layout for (called before encoding, and again
    before writing).

    Raises:
        EditFileError: naming the format, the family and the formats that work for it.
    """
    usable = "the diffusers, delta or lora format"
    if not family.diffusers_lora:
        usable = "the diffusers or delta format"
    if "lora" in formats and not family.diffusers_lora:
        raise EditFileError(
            f"the lora format is not loadable for {family.label}: its diffusers pipeline has no "
            f"load_lora_weights — use {usable}"
        )
    if "lora-kohya" in formats and any(family.kohya_name(key) is None for key in keys):
        raise EditFileError(
            f"the lora-kohya format has no layout for {family.label} — uce writes kohya LoRA keys "
            f"for families that have them; use {usable}"
        )
    if "single-file" in formats and family.single_file() is None:
        raise EditFileError(
            f"the single-file format has no layout for {family.label} — uce writes none for this "
            f"family; use {usable}"
        )


def write_formats(
    stage: Path,
    model: BaseModelFiles,
    formats: list[str],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    metadata: dict[str, str],
    k: torch.Tensor | dict[str, torch.Tensor] | None = None,
    projections: list[str] | None = None,
    lora_rank: int | None = None,
    hashes: HashBook | None = None,
) -> Written:
    """Write the edit ``old → new`` (diffusers k/v keys) of ``model`` in each requested format.

    Args:
        stage: the staging folder (renamed into place by the caller).
        model: the base the edit applies to.
        formats: names from ``FORMATS``.
        old: W_old per edited key; new: W_new per edited key.
        metadata: strings stored in every file's header (base model, recipe hash, alignment, …).
        k: the operator per group (a bare tensor: the one group's), when the edit is one (LoRA
            then factors W_old(K − I) in float64; required for the operator format).
        projections: the projections K applies to (operator format).
        lora_rank: truncate LoRA factors to this rank (None: exact).
        hashes: receives the hashes of files it wrote or copied, so they are not read again.

    Metadata keys are written sorted and tensors in a fixed order, so the same edit gives the same
    bytes (``uce_cli.weights.tensorfile``).

    Raises:
        EditFileError: unknown format, a bad LoRA rank, or the operator format without an operator.
        SolveError: an edited tensor holds NaN/inf (checked before anything is written).
    """
    formats = check_formats(formats)
    written = Written()
    if not formats:
        return written
    family = model.family
    assert family is not None
    if isinstance(k, torch.Tensor):
        [group] = {t.group for t in model.kv}
        k = {group: k}
    group_of = {t.key: t.group for t in model.kv}
    tensor_of = {t.key: t for t in model.kv}
    refuse_formats(family, formats, list(new))
    for key, w in new.items():
        check_result(f"{model.denoiser}.{key}", w)
    meta = {"family": family.name, **metadata}
    if "text_encoder_weights_sha256" not in meta:  # hashing reads the whole text encoder
        meta["text_encoder_weights_sha256"] = text_encoder_weights_sha256(model.root, model.family)
    if any(f.startswith("lora") for f in formats):
        check_rank(lora_rank, {f"{model.denoiser}.{key}": tuple(w.shape) for key, w in new.items()})
    if "operator" in formats and k is None:
        raise EditFileError(
            "the operator format needs an operator edit (uce apply, or uce transfer/merge of an operator)"
        )
    prefixed = {f"{model.denoiser}.{key}": w for key, w in new.items()}
    if "diffusers" in formats:
        written.files += write_diffusers(stage, model, new, hashes)
    if "delta" in formats:
        saved = write_delta(stage / DELTA_FILE, prefixed, {**meta, "format": "uce-delta"})
        written.add(stage, DELTA_FILE, saved, hashes)
    if any(f.startswith("lora") for f in formats):
        factors = {}
        # exact: ΔW = W_old (K − I), not the difference of rounded weights; K − I is factored
        # once per group and each layer is one GEMM (no SVD per layer)
        shared = {g: factor_operator(kg) for g, kg in k.items()} if k is not None else {}
        for key, w_new in new.items():
            if k is not None:
                t = tensor_of[key]  # a layer read in some columns: ΔW is 0 in the others
                f = operator_lora_factors(t.part(old[key]), shared[group_of[key]], lora_rank)
                down = t.whole(torch.zeros(f.rank, t.shape[1]), f.down)
                factors[key] = LoraFactors(f.up, down.contiguous(), f.rank, f.rel_error)
            else:
                delta = w_new.to(torch.float64) - old[key].to(torch.float64)
                factors[key] = factorize_delta(delta, lora_rank)
            written.layers[f"{model.denoiser}.{key}"] = {
                "lora_rank": factors[key].rank,
                "lora_rel_error": factors[key].rel_error,
            }
        for name, layout in (("lora", "diffusers"), ("lora-kohya", "kohya")):
            if name in formats:
                lora_meta = {
                    **meta,
                    "format": "uce-lora",
                    "lora_layout": layout,
                    "lora_rank": str(lora_rank or "exact"),
                }
                saved = save_tensors(
                    lora_state_dict(factors, layout, model.denoiser, family.kohya_name),
                    stage / FORMAT_FILES[name],
                    lora_meta,
                )
                written.add(stage, FORMAT_FILES[name], saved, hashes)
    if "single-file" in formats:
        saved = write_single(stage / SINGLE_FILE, model, new, meta)
        written.add(stage, SINGLE_FILE, saved, hashes)
    if "operator" in formats:
        saved = write_operator(stage / OPERATOR_FILE, k, projections or ["to_k", "to_v"], meta)
        written.add(stage, OPERATOR_FILE, saved, hashes)
    return written


@dataclass
class Edit:
    """An edit read from disk, in one of the formats (or a whole model to compare with)."""

    kind: str  # delta | lora | operator | model
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # delta: diffusers key → W_new; lora: raw
    operator: Operator | None = None
    model: str | None = None  # kind == model: a model spec (folder, single file, hub id)

    @property
    def needs_base(self) -> bool:
        """LoRA factors and operators are relative to a base; deltas and models are not."""
        return self.kind in ("lora", "operator")


def load_edit(path: Path | str, allow_pickle: bool = False) -> Edit:
    """Recognise and read an edit: delta, LoRA (either layout), operator, single file, diffusers folder or hub id.

    Raises:
        EditFileError: missing, corrupt, a refused pickle, or not an edit uce knows.
    """
    spec = str(path)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return Edit("model", path, model=str(path))
        for name in _FOLDER_ORDER:
            if (path / name).is_file():
                return load_edit(path / name, allow_pickle)
        raise EditFileError(
            f"{path}: no diffusers model and no edit file ({', '.join(_FOLDER_ORDER)}) in this folder"
        )
    if not path.exists():
        if spec.startswith("builtin:") or ("/" in spec and not spec.startswith((".", "/", "~"))):
            return Edit("model", path, model=spec)
        raise EditFileError(f"{path}: no such file or folder — check the path")
    refuse_pickle(path, allow_pickle)
    if is_pickle(path):
        tensors, meta = read_tensors(path, allow_pickle)
        keys = list(tensors)
    else:
        keys, meta = read_metadata(path)
        tensors = {}
    fmt = meta.get("format", "")
    if fmt == "uce-operator" or keys == ["K"]:
        return Edit("operator", path, meta, operator=read_operator(path, allow_pickle))
    found = single_file_layout(keys)
    if found is not None:
        names = found[1].editable_names(keys)
        kv = {name: tensors[key] for key, name in names.items()} if tensors else {}
        return Edit("model", path, meta, kv, model=str(path))  # pickle: tensors already read
    tensors = tensors or read_tensors(path)[0]
    if fmt == "uce-lora" or is_lora(keys):
        return Edit("lora", path, meta, tensors)
    denoiser = keys[0].split(".")[0] if keys else ""
    if fmt == "uce-delta" or (
        denoiser in DENOISERS and all(k.startswith(f"{denoiser}.") for k in keys)
    ):
        return Edit(
            "delta", path, meta,
            {k.removeprefix(f"{denoiser}."): v for k, v in tensors.items()},
        )  # fmt: skip
    raise EditFileError(
        f"{path}: not a uce edit (delta, LoRA, operator) nor a checkpoint — first tensor '{keys[0]}'"
    )


def _check_text_encoder(edit: Edit, base: BaseModelFiles) -> None:
    expected = edit.metadata.get("text_encoder_weights_sha256")
    if expected and expected != text_encoder_weights_sha256(base.root, base.family):
        raise EditFileError(
            f"{edit.path}: text_encoder_weights_sha256 {expected[:12]}… does not match {base.spec}'s text encoder — "
            "this edit was made for a base with another text encoder"
        )


def edit_weights(edit: Edit, base: BaseModelFiles | None) -> dict[str, torch.Tensor]:
    """The edited k/v weights (diffusers key → tensor) an edit gives, on ``base`` where it needs one.

    Deltas and LoRAs are checked against the base: every key must exist with the same shape, and a
    recorded text-encoder hash must match. Models give all their k/v weights. Edit tensors, the
    base weights they are applied to and the results must be finite.

    Raises:
        EditFileError: naming the first offending tensor or field.
        ModelError: a base weight holds NaN/inf (naming it and its file).
        SolveError: a result holds NaN/inf (it overflows the weight dtype).
    """
    if edit.kind == "delta":  # named as in the file
        check_finite({f"unet.{k}": v for k, v in edit.tensors.items()}, edit.path, "delta tensor")
    elif edit.kind == "lora":
        check_finite(edit.tensors, edit.path, "LoRA tensor")
    if edit.kind == "model":
        path = Path(edit.model or "")
        if edit.tensors:
            return dict(edit.tensors)
        if path.is_file():
            return read_single_file_editable(path)
        return open_model(edit.model or str(edit.path)).read_kv()
    if base is None:
        if edit.kind == "delta":
            return dict(edit.tensors)
        raise EditFileError(
            f"{edit.path}: a {edit.kind} edit is relative to a base model — pass --base MODEL"
        )
    shapes = {t.key: t.shape for t in base.kv}
    if edit.kind == "operator":
        assert edit.operator is not None
        check_operator_base(edit.operator, base, edit.path)
        return operator_weights(edit.operator, base)
    _check_text_encoder(edit, base)
    if edit.kind == "lora":
        assert base.family is not None
        deltas = read_lora_deltas(edit.tensors, list(shapes), base.denoiser, base.family.kohya_name)
        for key, dw in deltas.items():
            if tuple(dw.shape) != shapes[key]:
                raise EditFileError(
                    f"{edit.path}: LoRA for {key} is {tuple(dw.shape)}, the base's tensor is {shapes[key]}"
                )
        old = base.read_kv(list(deltas))
        check_base_weights(old, kv_files(base))
        out = {
            key: (old[key].to(torch.float64) + dw).to(old[key].dtype) for key, dw in deltas.items()
        }
        for key, w in out.items():
            check_result(f"{base.denoiser}.{key}", w)
        return out
    dtypes = {t.key: t.dtype for t in base.kv}
    out: dict[str, torch.Tensor] = {}
    for key, w in edit.tensors.items():
        if key not in shapes:
            raise EditFileError(
                f"{edit.path}: tensor '{base.denoiser}.{key}' is not a cross-attention k/v tensor of {base.spec} — wrong base"
            )
        if tuple(w.shape) != shapes[key]:
            raise EditFileError(
                f"{edit.path}: tensor '{base.denoiser}.{key}' is {tuple(w.shape)}, {base.spec} has {shapes[key]} — wrong base"
            )
        out[key] = w.to(weight_dtype(dtypes[key]))
        check_result(f"{base.denoiser}.{key}", out[key])
    return out
