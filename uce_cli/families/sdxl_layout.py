"""SDXL single files (SGM / A1111 / ComfyUI layout): key names to and from diffusers, and the whole
pipeline as one state dict that ``StableDiffusionXLPipeline.from_single_file`` loads.

Layout (diffusers' ``loaders/single_file_utils.py`` reads exactly this)::

    model.diffusion_model.            UNet, LDM block numbering with stride layers_per_block + 1
                                      (down_blocks.{i}.attentions.{j} ↔ input_blocks.{3i+j+1}.1,
                                      mid_block.attentions.0 ↔ middle_block.1,
                                      up_blocks.{i}.attentions.{j} ↔ output_blocks.{3i+j}.1,
                                      add_embedding.linear_{1,2} ↔ label_emb.0.{0,2})
    first_stage_model.                VAE, as in SD 1.x (mid-block attention as 1×1 convolutions)
    conditioner.embedders.0.transformer.text_model.   CLIP-L, transformers' own names
    conditioner.embedders.1.model.    OpenCLIP-bigG: transformer.resblocks.{i}.attn.in_proj_weight
                                      = [q; k; v] stacked, ln_1/ln_2, mlp.c_fc/c_proj,
                                      token_embedding, positional_embedding, ln_final, and
                                      text_projection stored transposed (hidden × projection)

The bigG part is not a renaming (q/k/v are stacked into one tensor), so this module converts
tensors, not only names.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from uce_cli.errors import ModelError
from uce_cli.families.base import SingleFileLayout
from uce_cli.families.sd_singlefile import (
    is_vae_attn_matrix,
    kv_key_from_ldm,
    kv_key_to_ldm,
    ldm_stride,
    unet_key_to_ldm,
    vae_key_to_ldm,
)
from uce_cli.weights.files import index_shards, read_header
from uce_cli.weights.tensorfile import SavedFile, save_tensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIG_G_PREFIX = "conditioner.embedders.1.model."
HUB_CONFIG = "stabilityai/stable-diffusion-xl-base-1.0"
POOLED_SGM = "label_emb.0.0.weight"
_ADD_EMBEDDING = {
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
# transformers CLIP encoder-layer names → OpenCLIP resblock names (diffusers' own table, reversed).
_BIG_G_LAYER = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_BIG_G_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}
_QKV = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_WEIGHTS = (
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
)
# What a converted folder takes from the config folder besides the weights.
_CONFIG_COMPONENTS = (*(c for c, _ in _WEIGHTS), "tokenizer", "tokenizer_2", "scheduler")


def unet_key_to_sgm(key: str, stride: int, up_has_attention: Sequence[bool] = ()) -> str:
    """A diffusers SDXL UNet key → its SGM name (without ``model.diffusion_model.``).

    ``up_has_attention`` is needed only for upsampler keys (``output_blocks.N.{1|2}.conv``).
    """
    for old, new in _ADD_EMBEDDING.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    return unet_key_to_ldm(key, stride - 1, list(up_has_attention))


def big_g_key(key: str) -> str:
    """A ``CLIPTextModelWithProjection`` key → its OpenCLIP name (q/k/v → the stacked in_proj)."""
    if key in _BIG_G_FIXED:
        return _BIG_G_FIXED[key]
    if m := _QKV.match(key):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
    m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.*)$", key)
    if m is None:
        raise ModelError(f"text_encoder_2 tensor '{key}' has no OpenCLIP single-file name")
    rest = m[2]
    for old, new in _BIG_G_LAYER:
        if rest.startswith(old):
            rest = new + rest.removeprefix(old)
            break
    return f"transformer.resblocks.{m[1]}.{rest}"


def _weight_files(folder: Path, stem: str) -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return index_shards(index)
    return [folder / f"{stem}.safetensors"]


def _tensors(folder: Path, stem: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _weight_files(folder, stem):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, f.get_tensor(key)


def _namer(root: Path) -> Callable[[str, str], str]:
    """(component, diffusers key) → single-file key, for the folder (or config folder) ``root``."""
    unet_cfg = json.loads((root / "unet" / "config.json").read_text())
    vae_cfg = json.loads((root / "vae" / "config.json").read_text())
    stride = int(unet_cfg["layers_per_block"]) + 1
    up_attn = ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    n_vae = len(vae_cfg["block_out_channels"])

    def name(component: str, key: str) -> str:
        if component == "unet":
            return UNET_PREFIX + unet_key_to_sgm(key, stride, up_attn)
        if component == "vae":
            return VAE_PREFIX + vae_key_to_ldm(key, n_vae)
        if component == "text_encoder":
            return CLIP_L_PREFIX + "text_model." + key.removeprefix("text_model.")
        return BIG_G_PREFIX + big_g_key(key)

    return name


def single_file_state(root: Path, new_unet: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole SDXL pipeline at ``root`` as one SGM-named state dict, with edited UNet tensors.

    Args:
        root: a diffusers SDXL folder (safetensors weights).
        new_unet: diffusers UNet key → edited tensor (full shape); the rest is copied unchanged.
    """
    name = _namer(root)
    state: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # bigG in_proj key → its q, k, v parts
    for component, stem in _WEIGHTS:
        for key, tensor in _tensors(root / component, stem):
            if key.endswith("position_ids"):
                continue
            single = name(component, key)
            if component == "unet":
                state[single] = new_unet.get(key, tensor)
            elif component == "vae" and is_vae_attn_matrix(single) and tensor.dim() == 2:
                state[single] = tensor.reshape(*tensor.shape, 1, 1)  # LDM: 1×1 convolutions
            elif component == "text_encoder_2" and (m := _QKV.match(key)) is not None:
                qkv.setdefault(single, {})[m[2]] = tensor
            elif component == "text_encoder_2" and key == "text_projection.weight":
                state[single] = tensor.T.contiguous()  # OpenCLIP: (hidden, projection)
            else:
                state[single] = tensor
    for single, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ModelError(f"{root / 'text_encoder_2'}: {single} lacks one of q/k/v projections")
        state[single] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3·d, d)
    return state


class SdxlSingleFile(SingleFileLayout):
    """Key names of SDXL single files."""

    def claims(self, keys: Sequence[str]) -> bool:
        """True for an SDXL base file: a UNet, CLIP-L under embedders.0 and bigG under embedders.1."""
        return (
            any(k.startswith(UNET_PREFIX) for k in keys)
            and any(k.startswith(CLIP_L_PREFIX) for k in keys)
            and any(k.startswith(BIG_G_PREFIX + "transformer.resblocks.") for k in keys)
        )

    def editable_names(self, keys: Sequence[str]) -> dict[str, str]:
        """{single-file key: diffusers key} for every attn2 to_k/to_v and add_embedding.linear_1."""
        stride = ldm_stride(list(keys))
        names = {k: name for k in keys if (name := kv_key_from_ldm(k, stride)) is not None}
        if UNET_PREFIX + POOLED_SGM in keys:
            names[UNET_PREFIX + POOLED_SGM] = "add_embedding.linear_1.weight"
        return names

    def to_single_file(self, root: Path) -> dict[str, dict[str, str]]:
        """component → {diffusers key: single-file key}; bigG's q/k/v all name their stacked in_proj."""
        name = _namer(root)
        return {
            component: {
                key: name(component, key)
                for file in _weight_files(root / component, stem)
                for key in read_header(file)[0]
                if not key.endswith("position_ids")
            }
            for component, stem in _WEIGHTS
        }

    def config_source(self, keys: Sequence[str]) -> str:
        """SDXL base's configs (what diffusers itself uses for such a file)."""
        return HUB_CONFIG

    def editable_key(self, key: str, keys: Sequence[str]) -> str:
        """The single-file key of a diffusers editable key, in a file with these keys."""
        if key == "add_embedding.linear_1.weight":
            return UNET_PREFIX + POOLED_SGM
        return kv_key_to_ldm(key, ldm_stride(list(keys)))

    def write(
        self, path: Path, root: Path, new: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> SavedFile:
        """The whole pipeline at ``root`` as one SGM single file, with the edited UNet tensors."""
        return save_tensors(single_file_state(root, new), path, metadata)

    def convert(self, path: Path, config_root: Path, dest: Path) -> None:
        """Write a diffusers folder at ``dest`` from an SDXL single file and a config folder.

        Raises:
            ModelError: a tensor the config expects is missing or has another shape (named).
        """
        copy_configs(config_root, dest)
        name = _namer(config_root)
        present = set(read_header(path)[0])
        with safe_open(str(path), framework="pt") as f:
            for component, stem in _WEIGHTS:
                state: dict[str, torch.Tensor] = {}
                for key, shape in _meta_shapes(config_root, component).items():
                    single = name(component, key)
                    if single not in present:
                        raise ModelError(
                            f"{path}: tensor '{single}' ({component} {key}) is missing — not an "
                            "SDXL checkpoint of this pipeline's shape"
                        )
                    tensor = f.get_tensor(single)
                    if m := _QKV.match(key) if component == "text_encoder_2" else None:
                        tensor = tensor.chunk(3, dim=0)["qkv".index(m[2])]
                    elif component == "text_encoder_2" and key == "text_projection.weight":
                        tensor = tensor.T
                    if tensor.numel() != torch.Size(shape).numel():
                        raise ModelError(
                            f"{path}: tensor '{single}' has shape {tuple(tensor.shape)}, the "
                            f"config expects {shape}"
                        )
                    state[key] = tensor.reshape(shape).contiguous()
                (dest / component).mkdir(parents=True, exist_ok=True)
                save_file(state, str(dest / component / f"{stem}.safetensors"), {"format": "pt"})


def _meta_shapes(root: Path, component: str) -> dict[str, tuple[int, ...]]:
    """A component's diffusers keys and shapes from its config alone (meta tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = root / component
    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        elif component == "vae":
            model = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
        else:
            cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
            model = cls(CLIPTextConfig.from_pretrained(folder))
    return {
        k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")
    }


def copy_configs(config_root: Path, dest: Path) -> None:
    """Non-weight files of the config folder's SDXL components; the others become [null, null]."""
    index = json.loads((config_root / "model_index.json").read_text())
    for component, value in list(index.items()):
        if component.startswith("_") or not isinstance(value, list):
            continue
        if component not in _CONFIG_COMPONENTS:  # image encoder, feature extractor: not in the file
            index[component] = [None, None]
            continue
        for src in (config_root / component).glob("*"):
            if (
                src.is_file()
                and ".safetensors" not in src.name
                and src.suffix not in (".bin", ".ckpt", ".pt")
            ):
                (dest / component).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / component / src.name)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
