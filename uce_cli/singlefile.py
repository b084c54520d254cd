"""Single-file (LDM / A1111 / ComfyUI) checkpoints: key names to and from diffusers, and their k/v tensors.

An SD 1.x single file holds the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.`` and the CLIP text encoder under ``cond_stage_model.transformer.``, with
the original LDM module names. The mapping follows diffusers' own conversion scripts, generalised
to any ``layers_per_block`` (stride ``L + 1`` through ``input_blocks``/``output_blocks``)::

    down_blocks.{i}.attentions.{j}  ↔  input_blocks.{(L+1)·i + j + 1}.1
    mid_block.attentions.0          ↔  middle_block.1
    up_blocks.{i}.attentions.{j}    ↔  output_blocks.{(L+1)·i + j}.1

Inside a transformer block the names are the same (``transformer_blocks.0.attn2.to_k.weight``).
SD 2.x files share the UNet and VAE layout but store an OpenCLIP text encoder, which is not
mapped here: their k/v tensors can be read and patched, the full model cannot be converted.
Converting, caching and writing whole files lives in ``uce_cli.formats.checkpoint``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from uce_cli.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

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


def read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """(tensor keys, metadata) of a safetensors file, with a clear error for a corrupt file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError: both mean "cannot use this file"
        raise ModelError(
            f"cannot read {path}: {exc} — the file is corrupt or not safetensors"
        ) from None


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
