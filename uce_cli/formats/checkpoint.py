"""Single-file checkpoints as models: convert one to a cached diffusers folder, write one from a folder.

A single file holds no tokenizer or component configs, so opening one needs a pipeline config:
the ``config`` its metadata names (uce writes its base there), else SD 1.5's from the Hub (configs
only, cached). The conversion is done once per file and kept in the uce cache; the edit then runs
on the cached folder, and the single-file output is the original file with only the edited k/v
tensors' bytes rewritten. Key names come from ``uce_cli.singlefile``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from uce_cli.errors import ModelError, OutputError
from uce_cli.formats.files import EditFileError, is_pickle, load_pickle, refuse_pickle
from uce_cli.model import BaseModelFiles, open_model, resolve_model
from uce_cli.outputs import patch_safetensors, sha256_file
from uce_cli.paths import cache_folder
from uce_cli.singlefile import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    is_vae_attn_matrix,
    kv_key_to_ldm,
    ldm_stride,
    read_header,
    text_key_to_ldm,
    unet_key_to_ldm,
    vae_key_to_ldm,
)
from uce_cli.tensorfile import SavedFile, save_tensors

# Pipeline configs for files that do not name their own (diffusers' choice for SD 1.x files).
SD1_CONFIG = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The components a single file holds, with the stem of their diffusers weight files.
_WEIGHT_STEMS = (
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
)


def _components(root: Path) -> tuple[dict, dict, dict]:
    cfg = {
        c: json.loads((root / c / "config.json").read_text())
        for c in ("unet", "vae", "text_encoder")
    }
    return cfg["unet"], cfg["vae"], cfg["text_encoder"]


def _check_sd1_text_encoder(text_cfg: dict) -> None:
    if (
        text_cfg.get("architectures", ["CLIPTextModel"])[0] != "CLIPTextModel"
        or text_cfg.get("hidden_act") == "gelu"
    ):
        raise OutputError(
            "single-file output maps SD 1.x models (CLIP text encoder) only; this text encoder "
            f"({text_cfg.get('architectures')}, {text_cfg.get('hidden_act')}) is SD 2.x's — use the diffusers or delta format"
        )


def diffusers_to_ldm_names(root: Path) -> dict[str, dict[str, str]]:
    """{component: {diffusers key: single-file key}} for the weight files of a diffusers SD 1.x folder."""
    unet_cfg, vae_cfg, text_cfg = _components(root)
    _check_sd1_text_encoder(text_cfg)
    up_attn = ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    n_vae = len(vae_cfg["block_out_channels"])
    names: dict[str, dict[str, str]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for component, stem in _WEIGHT_STEMS:
        for file in _weights(root / component, stem):
            for key in read_header(file)[0]:
                if component == "unet":
                    names[component][key] = UNET_PREFIX + unet_key_to_ldm(
                        key, unet_cfg["layers_per_block"], up_attn
                    )
                elif component == "vae":
                    names[component][key] = VAE_PREFIX + vae_key_to_ldm(key, n_vae)
                elif not key.endswith("position_ids"):
                    names[component][key] = text_key_to_ldm(key)
    return names


def _weights(folder: Path, stem: str) -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [
            folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    return [folder / f"{stem}.safetensors"]


def write_single_file(
    path: Path, root: Path, new_unet: dict[str, torch.Tensor], metadata: dict[str, str]
) -> SavedFile:
    """Write the whole pipeline at ``root`` as one LDM-named safetensors file, with edited UNet tensors.

    Args:
        path: the file to write (inside a staging folder).
        root: a diffusers SD 1.x folder (unet, vae, text_encoder safetensors).
        new_unet: diffusers UNet key → edited tensor; every other tensor is copied unchanged.
        metadata: stored in the file header (strings).

    Returns:
        The file's digests (it is written byte-reproducibly, ``uce_cli.tensorfile``).
    """
    names = diffusers_to_ldm_names(root)
    state: dict[str, torch.Tensor] = {}
    for component, stem in _WEIGHT_STEMS:
        for file in _weights(root / component, stem):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key not in names[component]:
                        continue
                    tensor = (
                        new_unet[key]
                        if component == "unet" and key in new_unet
                        else f.get_tensor(key)
                    )
                    ldm = names[component][key]
                    state[ldm] = (
                        tensor.reshape(*tensor.shape, 1, 1)
                        if is_vae_attn_matrix(ldm) and tensor.dim() == 2
                        else tensor
                    )
    return save_tensors(state, path, metadata)


def _meta_keys(root: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Expected diffusers keys and shapes per component, from configs only (meta tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(root / "unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        }
    return {
        c: {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.endswith("position_ids")}
        for c, m in models.items()
    }


def convert_single_file(path: Path, config_root: Path, dest: Path) -> None:
    """Write a diffusers folder at ``dest`` from a single file plus a config folder (no weights read from it).

    Raises:
        ModelError: a tensor the config expects is missing or has another shape (named).
    """
    keys, _ = read_header(path)
    unet_cfg, vae_cfg, _ = _components(config_root)
    expected = _meta_keys(config_root)
    up_attn = ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    present = set(keys)
    legacy_clip = not any(k.startswith(CLIP_PREFIX + "text_model.") for k in keys)
    with safe_open(str(path), framework="pt") as f:
        for component, folder_file in (
            ("unet", "unet/diffusion_pytorch_model.safetensors"),
            ("vae", "vae/diffusion_pytorch_model.safetensors"),
            ("text_encoder", "text_encoder/model.safetensors"),
        ):
            state: dict[str, torch.Tensor] = {}
            for key, shape in expected[component].items():
                if component == "unet":
                    ldm = UNET_PREFIX + unet_key_to_ldm(key, unet_cfg["layers_per_block"], up_attn)
                elif component == "vae":
                    ldm = VAE_PREFIX + vae_key_to_ldm(key, len(vae_cfg["block_out_channels"]))
                else:
                    ldm = text_key_to_ldm(key)
                    if legacy_clip:
                        ldm = CLIP_PREFIX + ldm.removeprefix(CLIP_PREFIX + "text_model.")
                if ldm not in present:
                    raise ModelError(
                        f"{path}: tensor '{ldm}' ({component} {key}) is missing — not a checkpoint of this model family"
                    )
                tensor = f.get_tensor(ldm)
                if tensor.numel() != torch.Size(shape).numel():
                    raise ModelError(
                        f"{path}: tensor '{ldm}' has shape {tuple(tensor.shape)}, the config expects {shape}"
                    )
                state[key] = tensor.reshape(shape).contiguous()
            (dest / folder_file).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(dest / folder_file), {"format": "pt"})


def config_source(path: Path, metadata: dict[str, str]) -> str:
    """The pipeline config for a single file: the ``config`` it names (uce writes it), else SD 1.x's."""
    named = metadata.get("config", "")
    if named.startswith("builtin:") or (named and Path(named).is_dir()):
        return named
    if named and re.match(r"^[\w.-]+/[\w.-]+$", named) and not Path(named).exists():
        return named
    return SD1_CONFIG


def _copy_configs(config_root: Path, dest: Path) -> None:
    """Non-weight files of the config folder; components the single file lacks become [null, null]."""
    index = json.loads((config_root / "model_index.json").read_text())
    for name, value in list(index.items()):
        if name.startswith("_") or not isinstance(value, list):
            continue
        if name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            for src in (config_root / name).glob("*"):
                if (
                    src.is_file()
                    and ".safetensors" not in src.name
                    and src.suffix not in (".bin", ".ckpt", ".pt")
                ):
                    (dest / name).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest / name / src.name)
        else:  # safety checker, feature extractor: not part of an LDM single file
            index[name] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def cached_diffusers_folder(path: Path, config_root: Path, cache: Path) -> Path:
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
        _copy_configs(config_root, stage)
        convert_single_file(path, config_root, stage)
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

    from uce_cli.hub import hub_unreachable

    try:
        return Path(
            snapshot_download(
                spec,
                allow_patterns=["model_index.json", "*/*.json", "*/*.txt", "tokenizer/*"],
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


def _pickle_copy(path: Path, cache: Path) -> Path:
    """A safetensors copy (in the cache, keyed by the file's sha256) of a pickle checkpoint."""
    dest = cache / "single-file" / f"pickle-{sha256_file(path)[:20]}.safetensors"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        save_file(load_pickle(path), str(tmp), {"source": path.name})
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def open_single_file(path: Path, allow_pickle: bool = False) -> BaseModelFiles:
    """Open a single-file checkpoint for editing: its cached diffusers copy, remembering the file.

    The pipeline config (tokenizer, scheduler, component configs) comes from the ``config`` the file
    names in its metadata (uce's single-file output names its base), else SD 1.5's.

    Raises:
        ModelError: not an SD 1.x single file, missing tensors, or a pickle without ``allow_pickle``.
    """
    if is_pickle(path):
        refuse_pickle(path, allow_pickle)
        path = _pickle_copy(path, cache_folder())
    elif path.suffix != ".safetensors":
        raise ModelError(
            f"model '{path}' is a file but not .safetensors — give a single-file checkpoint, a diffusers folder or a hub id"
        )
    keys, metadata = read_header(path)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelError(
            f"{path} has no '{UNET_PREFIX}*' tensors — not a single-file Stable Diffusion checkpoint"
        )
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        raise ModelError(
            f"{path} is an SD 2.x single file (OpenCLIP text encoder), which uce cannot convert — "
            "convert it to a diffusers folder first (diffusers' from_single_file + save_pretrained)"
        )
    folder = cached_diffusers_folder(
        path, _config_folder(config_source(path, metadata)), cache_folder()
    )
    return dataclasses.replace(open_model(str(folder)), spec=str(path), single_file=path)


def write_single(
    path: Path, model: BaseModelFiles, new: dict[str, torch.Tensor], meta: dict[str, str]
) -> SavedFile | None:
    """A single file: a patched copy of the base's own single file, else the diffusers base converted.

    Returns:
        The digests of a converted file; None for a patched copy (it keeps the base's header).
    """
    source = getattr(model, "single_file", None)
    if source is None:
        return write_single_file(
            path,
            model.root,
            new,
            {**meta, "format": "uce-single-file", "config": meta.get("base_model", "")},
        )
    stride = ldm_stride(read_header(source)[0])
    mapped = {kv_key_to_ldm(key, stride): w for key, w in new.items()}
    patched = patch_safetensors(source, path, mapped)
    missing = sorted(set(mapped) - set(patched))
    if missing:
        raise EditFileError(
            f"{source}: tensor '{missing[0]}' is missing — the single file does not match its converted copy"
        )
    return None
