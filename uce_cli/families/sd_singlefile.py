"""The Stable Diffusion 1.x/2.x single-file (LDM / A1111 / ComfyUI) layout: key names to and from
diffusers, and whole files converted to and written from a diffusers folder.

An SD single file holds the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the text encoder under ``cond_stage_model.``: SD 1.x's CLIP as
``cond_stage_model.transformer.`` with transformers' names, SD 2.x's OpenCLIP-H as
``cond_stage_model.model.`` with OpenCLIP's names (``transformer.resblocks.N.attn.in_proj_weight``
holds q, k and v stacked; diffusers' ``convert_open_clip_checkpoint`` is the inverse). The UNet
mapping follows diffusers' own conversion scripts, generalised to any ``layers_per_block``
(stride ``L + 1`` through ``input_blocks``/``output_blocks``)::

    down_blocks.{i}.attentions.{j}  ↔  input_blocks.{(L+1)·i + j + 1}.1
    mid_block.attentions.0          ↔  middle_block.1
    up_blocks.{i}.attentions.{j}    ↔  output_blocks.{(L+1)·i + j}.1

Inside a transformer block the names are the same (``transformer_blocks.0.attn2.to_k.weight``).
A single file holds no tokenizer or component configs: opening one needs a pipeline config, the
``config`` its metadata names (uce writes its base there), else SD 1.5's (SD 2.1's for an
OpenCLIP file) from the Hub (configs only).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from uce_cli.errors import ModelError
from uce_cli.families.base import SingleFileLayout
from uce_cli.weights.files import index_shards, read_header
from uce_cli.weights.tensorfile import SavedFile, save_tensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# Pipeline configs for files that do not name their own (diffusers' choices for SD 1.x / 2.x files).
SD1_CONFIG = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD2_CONFIG = "stabilityai/stable-diffusion-2-1"
# The components a single file holds, with the stem of their diffusers weight files.
_WEIGHT_STEMS = (
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
)

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTN_TO_LDM = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
_KV_DIFFUSERS = re.compile(
    r"^(?:(?P<part>down_blocks|up_blocks)\.(?P<i>\d+)\.attentions\.(?P<j>\d+)|mid_block\.attentions\.0)"
    r"\.(?P<rest>transformer_blocks\.\d+\.attn2\.to_[kv]\.weight)$"
)
_KV_LDM = re.compile(
    r"^(?:(?P<part>input_blocks|output_blocks)\.(?P<n>\d+)\.1|middle_block\.1)"
    r"\.(?P<rest>transformer_blocks\.\d+\.attn2\.to_[kv]\.weight)$"
)


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    head, _, tail = rest.partition(".")
    return dict(table).get(head, head) + "." + tail


def unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """A diffusers UNet key → its LDM name (without the ``model.diffusion_model.`` prefix).

    Raises:
        ModelError: a key outside the SD 1.x/2.x UNet layout (e.g. SDXL's ``add_embedding``).
    """
    stride = layers_per_block + 1
    fixed = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    if m := re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = stride * i + j + 1
        return (
            f"input_blocks.{n}.0.{_rename(rest, _RESNET_TO_LDM)}"
            if kind == "resnets"
            else f"input_blocks.{n}.1.{rest}"
        )
    if m := re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", key):
        return f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"^mid_block\.resnets\.(\d+)\.(.*)$", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], _RESNET_TO_LDM)}"
    if key.startswith("mid_block.attentions.0."):
        return "middle_block.1." + key.removeprefix("mid_block.attentions.0.")
    if m := re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = stride * i + j
        return (
            f"output_blocks.{n}.0.{_rename(rest, _RESNET_TO_LDM)}"
            if kind == "resnets"
            else f"output_blocks.{n}.1.{rest}"
        )
    if m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", key):
        i = int(m[1])
        return f"output_blocks.{stride * i + layers_per_block}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
    raise ModelError(
        f"UNet tensor '{key}' has no SD 1.x/2.x single-file name — only SD 1.x/2.x UNets map"
    )


def vae_key_to_ldm(key: str, num_blocks: int) -> str:
    """A diffusers VAE key → its LDM name (without the ``first_stage_model.`` prefix)."""
    side, _, rest = key.partition(".")
    if m := re.match(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest):
        rest = f"down.{m[1]}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.(.*)$", rest):
        rest = f"down.{m[1]}.downsample.{m[2]}"
    elif m := re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", rest):
        rest = f"up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", rest):
        rest = f"up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.match(r"^mid_block\.resnets\.(\d+)\.(.*)$", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
    elif rest.startswith("mid_block.attentions.0."):
        attn = rest.removeprefix("mid_block.attentions.0.")
        for old, ldm in _VAE_ATTN_TO_LDM:
            if attn.startswith(old):
                attn = ldm + attn.removeprefix(old)
                break
        rest = "mid.attn_1." + attn
    elif rest.startswith("conv_norm_out."):
        rest = "norm_out." + rest.removeprefix("conv_norm_out.")
    rest = rest.replace(".conv_shortcut.", ".nin_shortcut.")
    return f"{side}.{rest}" if side in ("encoder", "decoder") else key


def text_key_to_ldm(key: str) -> str:
    """A transformers CLIPTextModel key (with or without ``text_model.``) → its LDM name, prefixed."""
    return CLIP_PREFIX + "text_model." + key.removeprefix("text_model.")


def is_vae_attn_matrix(ldm_key: str) -> bool:
    # LDM stores the VAE mid-block attention projections as 1×1 convolutions (c, c, 1, 1).
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def kv_key_to_ldm(key: str, stride: int) -> str:
    """A diffusers cross-attention k/v key → its full single-file key (``stride`` = layers_per_block + 1)."""
    m = _KV_DIFFUSERS.match(key)
    if m is None:
        raise ModelError(f"'{key}' is not a cross-attention k/v key")
    if m["part"] is None:
        return f"{UNET_PREFIX}middle_block.1.{m['rest']}"
    i, j = int(m["i"]), int(m["j"])
    n = stride * i + j + 1 if m["part"] == "down_blocks" else stride * i + j
    part = "input_blocks" if m["part"] == "down_blocks" else "output_blocks"
    return f"{UNET_PREFIX}{part}.{n}.1.{m['rest']}"


def kv_key_from_ldm(key: str, stride: int) -> str | None:
    """A full single-file key → its diffusers k/v key, or None when it is not a cross-attention k/v."""
    m = _KV_LDM.match(key.removeprefix(UNET_PREFIX)) if key.startswith(UNET_PREFIX) else None
    if m is None:
        return None
    if m["part"] is None:
        return f"mid_block.attentions.0.{m['rest']}"
    n = int(m["n"])
    if m["part"] == "input_blocks":
        return f"down_blocks.{(n - 1) // stride}.attentions.{(n - 1) % stride}.{m['rest']}"
    return f"up_blocks.{n // stride}.attentions.{n % stride}.{m['rest']}"


def ldm_stride(keys: list[str]) -> int:
    """``layers_per_block + 1`` of a single-file UNet: the index of its first downsampler."""
    found = [
        int(m[1])
        for k in keys
        if (m := re.match(rf"^{re.escape(UNET_PREFIX)}input_blocks\.(\d+)\.0\.op\.", k))
    ]
    if not found:
        raise ModelError(
            "the single-file UNet has no downsamplers (input_blocks.N.0.op) — not an SD 1.x/2.x UNet"
        )
    return min(found)


def ldm_kv_names(keys: list[str]) -> dict[str, str]:
    """{single-file key: diffusers key} for every cross-attention k/v tensor among ``keys``.

    Raises:
        ModelError: no UNet tensors, or no downsamplers to tell the block stride by.
    """
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelError(f"no '{UNET_PREFIX}*' tensors — not a single-file SD checkpoint")
    stride = ldm_stride(keys)
    return {k: name for k in keys if (name := kv_key_from_ldm(k, stride)) is not None}


def read_single_file_kv(path: Path) -> dict[str, torch.Tensor]:
    """Every cross-attention k/v weight of a single-file checkpoint, under its diffusers name."""
    keys, _ = read_header(path)
    try:
        names = ldm_kv_names(keys)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(key) for key, name in names.items()}


def _components(root: Path) -> tuple[dict, dict, dict]:
    cfg = {
        c: json.loads((root / c / "config.json").read_text())
        for c in ("unet", "vae", "text_encoder")
    }
    return cfg["unet"], cfg["vae"], cfg["text_encoder"]


def is_open_clip(text_cfg: dict) -> bool:
    """True for SD 2.x's text encoder (OpenCLIP-H converted to a CLIPTextModel: plain GELU)."""
    return text_cfg.get("hidden_act") == "gelu"


_OPEN_CLIP_LAYER = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def open_clip_key_to_ldm(key: str) -> tuple[str, int | None]:
    """A CLIPTextModel key → (its OpenCLIP single-file key, prefixed; the q/k/v third it fills, or None).

    Raises:
        ModelError: a key outside the OpenCLIP text layout.
    """
    name = key.removeprefix("text_model.")
    if name in _OPEN_CLIP_FIXED:
        return OPEN_CLIP_PREFIX + _OPEN_CLIP_FIXED[name], None
    m = re.match(r"^encoder\.layers\.(\d+)\.(.*)$", name)
    if m is not None:
        block, rest = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{m[1]}.", m[2]
        if q := re.match(r"^self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$", rest):
            return f"{block}attn.in_proj_{q[2]}", _QKV[q[1]]
        for ours, theirs in _OPEN_CLIP_LAYER:
            if rest.startswith(ours):
                return block + theirs + rest.removeprefix(ours), None
    raise ModelError(f"text encoder tensor '{key}' has no OpenCLIP single-file name")


def diffusers_to_ldm_names(root: Path) -> dict[str, dict[str, str]]:
    """{component: {diffusers key: single-file key}} for the weight files of a diffusers SD folder.

    SD 2.x's q/k/v projections all map to their block's ``in_proj_*`` (stacked when written).
    """
    unet_cfg, vae_cfg, text_cfg = _components(root)
    open_clip = is_open_clip(text_cfg)
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
                elif key.endswith("position_ids"):
                    continue
                elif open_clip:
                    names[component][key] = open_clip_key_to_ldm(key)[0]
                else:
                    names[component][key] = text_key_to_ldm(key)
    return names


def _weights(folder: Path, stem: str) -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return index_shards(index)
    return [folder / f"{stem}.safetensors"]


def write_single_file(
    path: Path, root: Path, new_unet: dict[str, torch.Tensor], metadata: dict[str, str]
) -> SavedFile:
    """Write the whole pipeline at ``root`` as one LDM-named safetensors file, with edited UNet tensors.

    Args:
        path: the file to write (inside a staging folder).
        root: a diffusers SD 1.x/2.x folder (unet, vae, text_encoder safetensors).
        new_unet: diffusers UNet key → edited tensor; every other tensor is copied unchanged.
        metadata: stored in the file header (strings).

    Returns:
        The file's digests (it is written byte-reproducibly, ``uce_cli.weights.tensorfile``).
    """
    names = diffusers_to_ldm_names(root)
    open_clip = is_open_clip(_components(root)[2])
    state: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}  # OpenCLIP in_proj key → q/k/v thirds
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
                    if component == "text_encoder" and open_clip:
                        third = open_clip_key_to_ldm(key)[1]
                        if third is not None:
                            qkv.setdefault(ldm, {})[third] = tensor
                            continue
                    state[ldm] = (
                        tensor.reshape(*tensor.shape, 1, 1)
                        if is_vae_attn_matrix(ldm) and tensor.dim() == 2
                        else tensor
                    )
    for ldm, thirds in qkv.items():
        state[ldm] = torch.cat([thirds[0], thirds[1], thirds[2]])  # (3·d, d) / (3·d,): q, k, v
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


def _text_name(key: str, open_clip: bool, legacy_clip: bool) -> tuple[str, int | None]:
    """The single-file key (and q/k/v third) a text-encoder tensor is read from."""
    if open_clip:
        return open_clip_key_to_ldm(key)
    ldm = text_key_to_ldm(key)
    if legacy_clip:
        ldm = CLIP_PREFIX + ldm.removeprefix(CLIP_PREFIX + "text_model.")
    return ldm, None


def convert_single_file(path: Path, config_root: Path, dest: Path) -> None:
    """Write a diffusers folder at ``dest`` from a single file plus a config folder (no weights read from it).

    Raises:
        ModelError: a tensor the config expects is missing or has another shape (named).
    """
    keys, _ = read_header(path)
    unet_cfg, vae_cfg, text_cfg = _components(config_root)
    expected = _meta_keys(config_root)
    up_attn = ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    present = set(keys)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in keys)
    if open_clip != is_open_clip(text_cfg):
        raise ModelError(
            f"{path}: its text encoder is {'OpenCLIP (SD 2.x)' if open_clip else 'CLIP (SD 1.x)'} "
            f"but the config {config_root} is {'SD 2.x' if is_open_clip(text_cfg) else 'SD 1.x'}'s — "
            "give the file's own pipeline config"
        )
    legacy_clip = not any(k.startswith(CLIP_PREFIX + "text_model.") for k in keys)
    with safe_open(str(path), framework="pt") as f:
        for component, folder_file in (
            ("unet", "unet/diffusion_pytorch_model.safetensors"),
            ("vae", "vae/diffusion_pytorch_model.safetensors"),
            ("text_encoder", "text_encoder/model.safetensors"),
        ):
            state: dict[str, torch.Tensor] = {}
            for key, shape in expected[component].items():
                third = None
                if component == "unet":
                    ldm = UNET_PREFIX + unet_key_to_ldm(key, unet_cfg["layers_per_block"], up_attn)
                elif component == "vae":
                    ldm = VAE_PREFIX + vae_key_to_ldm(key, len(vae_cfg["block_out_channels"]))
                else:
                    ldm, third = _text_name(key, open_clip, legacy_clip)
                if ldm not in present:
                    raise ModelError(
                        f"{path}: tensor '{ldm}' ({component} {key}) is missing — not a checkpoint of this model family"
                    )
                tensor = f.get_tensor(ldm)
                if third is not None:  # q, k, v stacked along the output dimension
                    tensor = tensor.chunk(3, dim=0)[third]
                if tensor.numel() != torch.Size(shape).numel():
                    raise ModelError(
                        f"{path}: tensor '{ldm}' has shape {tuple(tensor.shape)}, the config expects {shape}"
                    )
                state[key] = tensor.reshape(shape).contiguous()
            (dest / folder_file).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(dest / folder_file), {"format": "pt"})


def copy_configs(config_root: Path, dest: Path) -> None:
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


class SDSingleFile(SingleFileLayout):
    """The SD 1.x/2.x LDM layout (A1111, ComfyUI, the original CompVis/Stability checkpoints)."""

    def claims(self, keys: Sequence[str]) -> bool:
        """A UNet under ``model.diffusion_model.`` and no SDXL ``conditioner.`` embedders."""
        return any(k.startswith(UNET_PREFIX) for k in keys) and not any(
            k.startswith("conditioner.") for k in keys
        )

    def editable_names(self, keys: Sequence[str]) -> dict[str, str]:
        """{single-file key: diffusers UNet key} of every cross-attention k/v tensor."""
        return ldm_kv_names(list(keys))

    def to_single_file(self, root: Path) -> dict[str, dict[str, str]]:
        """component → {diffusers key: single-file key} for a whole SD 1.x/2.x folder."""
        return diffusers_to_ldm_names(root)

    def config_source(self, keys: Sequence[str]) -> str:
        """SD 1.5's configs, or SD 2.1's for a file with an OpenCLIP text encoder."""
        return SD2_CONFIG if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys) else SD1_CONFIG

    def convert(self, path: Path, config_root: Path, dest: Path) -> None:
        """Write a diffusers folder at ``dest`` from the file and a config folder."""
        copy_configs(config_root, dest)
        convert_single_file(path, config_root, dest)

    def write(
        self, path: Path, root: Path, new: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> SavedFile:
        """The whole pipeline at ``root`` as one single file, with the edited UNet tensors."""
        return write_single_file(path, root, new, metadata)

    def editable_key(self, key: str, keys: Sequence[str]) -> str:
        """The single-file key of a diffusers editable key, in a file with these keys."""
        return kv_key_to_ldm(key, ldm_stride(list(keys)))
