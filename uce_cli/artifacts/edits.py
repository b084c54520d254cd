"""Edits for sampling: an edit file or ``uce apply`` folder read as the UNet tensors it replaces.

An edit is checked against the base model it is sampled on (same UNet keys and shapes; a folder may
differ from the base only in cross-attention k/v tensors), and swapped in and out of a UNet exactly.
"""

from __future__ import annotations

import filecmp
import hashlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from uce_cli.errors import UceError
from uce_cli.families.model import BaseModelFiles, open_model

DELTA_FORMAT = "uce-delta"


@dataclass
class EditTensors:
    """UNet tensors to swap into the base model, where they came from, and their hash."""

    source: Path
    tensors: dict[str, torch.Tensor]  # denoiser keys without the "unet." prefix
    sha256: str


def edit_base_model(path: Path) -> tuple[str, str | None]:
    """The base model an edit was made for: ``(spec, revision)`` from its edit log or metadata.

    Raises:
        UceError: not an edit, or it does not name its base model.
    """
    if path.is_dir():
        log_file = path / "edit_log.json"
        if log_file.is_file():
            from uce_cli.artifacts.editlog import read_edit_log

            base = read_edit_log(path).get("base_model", {})
            if base.get("spec"):
                return base["spec"], base.get("revision")
        if (path / "edit.safetensors").is_file():
            return edit_base_model(path / "edit.safetensors")
        raise UceError(f"--edit {path}: no edit_log.json naming the base model — pass --model")
    metadata = edit_file_metadata(path)
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
        if (path / base.denoiser).is_dir():
            tensors = _folder_edit_tensors(path, base)
        elif (path / "edit.safetensors").is_file():
            return load_edit_tensors(path / "edit.safetensors", base)
        else:
            raise UceError(
                f"--edit {path}: neither a pipeline folder ({base.denoiser}/) nor an edit.safetensors "
                "— give an output folder of `uce apply` or its edit file"
            )
    else:
        fmt = edit_file_metadata(path).get("format", "")
        if fmt == DELTA_FORMAT:
            tensors = _delta_edit_tensors(path, base)
        else:
            raise UceError(
                f"--edit {path}: unknown edit format {fmt!r} — uce sample reads {DELTA_FORMAT} files "
                "(edit.safetensors) and output folders of `uce apply`"
            )
    check_edit_values(path, tensors)
    return EditTensors(path, tensors, tensors_sha256(tensors))


def check_edit_values(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse an edit whose tensors are not floating point or hold NaN/inf: swapped into the
    model, they would be rounded or would turn every image into noise without a word.

    Raises:
        UceError: naming the file, the tensor and its dtype or count of non-finite values.
    """
    for key in sorted(tensors):
        t = tensors[key]
        if not t.is_floating_point() or t.element_size() < 2:
            raise UceError(
                f"--edit {path}: tensor {key} is {str(t.dtype).removeprefix('torch.')}, not a "
                "float32/float16/bfloat16/float64 weight — not an edit uce wrote"
            )
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise UceError(
                f"--edit {path}: tensor {key} holds {bad} NaN/inf value(s) — the edit is corrupt; "
                "re-run `uce apply`"
            )


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors (names, dtypes, shapes, bytes): the same edit hashes the same from
    an output folder and from its edit.safetensors."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def edit_file_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of an edit file.

    Raises:
        UceError: not a ``.safetensors`` file, or one that cannot be read.
    """
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
            if component != base.denoiser:
                raise UceError(
                    f"--edit {path}: tensor {key} edits '{component}'; uce sample applies "
                    f"{base.denoiser} edits only"
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
                if base.family is None or base.family.group_of(key) is None:
                    problems.append(f"{key} differs")
                changed[key] = new
    problems += _component_differences(folder, base.root, base.denoiser)
    if problems:
        raise _different_base(folder, base, problems)
    return changed


def _component_differences(folder: Path, base_root: Path, denoiser: str) -> list[str]:
    """Files of the folder's non-UNet components that are not byte-identical to the base's."""
    problems = []
    for src in sorted(folder.rglob("*")):
        rel = src.relative_to(folder)
        if (
            len(rel.parts) < 2
            or rel.parts[0] == denoiser
            or rel.parts[0] == "eval"  # `uce eval`'s report folder, not a model component
            or rel.parts[0].startswith(".")
            or src.is_dir()
        ):
            continue
        other = base_root / rel
        if not other.is_file() or not filecmp.cmp(src, other, shallow=False):
            problems.append(f"{rel} differs")
    return problems


def apply_edit(
    denoiser: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Copy ``tensors`` into the denoiser's parameters (cast to their dtype and device).

    Returns:
        The replaced tensors (clones): ``apply_edit(denoiser, returned)`` restores it exactly.
    """
    state = denoiser.state_dict()
    previous = {k: state[k].detach().clone() for k in tensors}
    denoiser.load_state_dict(tensors, strict=False)
    return previous
