"""Build a tiny, seeded Stable Diffusion XL pipeline for tests: random weights, but SDXL's structure
and on-disk layout, so the real loading, prompt-encoding and single-file paths are exercised.

What it shares with the real model (stabilityai/stable-diffusion-xl-base-1.0):

- two text encoders on one BPE: ``text_encoder`` (``CLIPTextModel``, quick-GELU, d1 = 32) and
  ``text_encoder_2`` (``CLIPTextModelWithProjection``, GELU, d2 = 48, pooled projection 40); the
  second tokenizer pads with ``"!"`` as SDXL's does, the first with EOS;
- a UNet with ``addition_embed_type="text_time"`` (pooled text + 6 time ids into
  ``add_embedding``), ``cross_attention_dim = d1 + d2``, ``layers_per_block = 2``, a first down
  block without attention, several transformer blocks per attention (``transformer_layers_per_block``)
  and linear ``proj_in``/``proj_out``;
- an ``AutoencoderKL`` with the 8× scale factor and an ``EulerDiscreteScheduler``.

d1, d2 and the projection width all differ, so a swapped or mis-sliced half cannot go unnoticed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from uce_cli.weights.destination import apply_default_modes
from uce_cli.weights.tiny import (
    _seeded,
    _tiny_vocab,
    _write_sd_tokenizer_files,
    build_tiny_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

__all__ = [
    "TINY_SDXL_NAME",
    "build_tiny_sdxl_pipeline",
    "build_tiny_sdxl_tokenizer_2",
    "ensure_tiny_sdxl",
    "write_tiny_sdxl",
]

TINY_SDXL_NAME = "builtin:tiny-sdxl"
# Bump whenever the builder changes, so an older cached folder is never taken for the current one.
_CACHE_SUBDIR = "tiny-sdxl-v1"
_MAX_LENGTH = 77
TEXT_WIDTH_1 = 32  # CLIP-L's 768 in SDXL
TEXT_WIDTH_2 = 48  # OpenCLIP-bigG's 1280
POOLED_WIDTH = 40  # bigG's projection (1280 in SDXL)
TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 in SDXL); 6 time ids


def build_tiny_sdxl_tokenizer_2() -> CLIPTokenizer:
    """The second tokenizer: the same BPE as the first, padding with ``"!"`` as SDXL's does."""
    from transformers import CLIPTokenizer

    first = build_tiny_tokenizer()
    vocab, merges = _tiny_vocab()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=first.unk_token,
        bos_token=first.bos_token,
        eos_token=first.eos_token,
        pad_token="!",
        model_max_length=_MAX_LENGTH,
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny, randomly initialized SDXL-shaped pipeline in memory (CPU, float32).

    Args:
        seed: seed for weight initialization; equal seeds give identical weights.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_sdxl_tokenizer_2()
    common = {
        "vocab_size": len(tokenizer),
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": _MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    # Each component is seeded separately so its weights do not depend on the others'.
    with _seeded(seed):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TEXT_WIDTH_1,
                intermediate_size=37,
                projection_dim=TEXT_WIDTH_1,
                hidden_act="quick_gelu",
                pad_token_id=tokenizer.pad_token_id,
                **common,
            )
        )
    with _seeded(seed + 1):
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=TEXT_WIDTH_2,
                intermediate_size=53,
                projection_dim=POOLED_WIDTH,
                hidden_act="gelu",
                pad_token_id=tokenizer_2.pad_token_id,
                **common,
            )
        )
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),  # diffusers' SDXL config names head counts so
            cross_attention_dim=TEXT_WIDTH_1 + TEXT_WIDTH_2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * TIME_EMBED_DIM,
            norm_num_groups=32,
        )
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=0.13025,
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_in_temp_dir(parent: Path, name: str, seed: int) -> Path:
    """Save the tiny SDXL pipeline into a fresh hidden temp dir inside ``parent``; return it."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        build_tiny_sdxl_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
        # Real SDXL folders ship vocab.json + merges.txt and no tokenizer.json, for both tokenizers.
        _write_sd_tokenizer_files(tmp / "tokenizer")
        _write_sd_tokenizer_files(tmp / "tokenizer_2")
        apply_default_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def write_tiny_sdxl(dest: Path, seed: int = 0) -> Path:
    """Write the tiny SDXL pipeline as a diffusers folder at ``dest`` (atomically); return ``dest``.

    Raises:
        FileExistsError: ``dest`` exists and is not an empty directory.
    """
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise FileExistsError(f"refusing to overwrite existing path: {dest}")
    tmp = _build_in_temp_dir(dest.parent, dest.name, seed)
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"refusing to overwrite existing path: {dest}") from exc
    return dest


def ensure_tiny_sdxl(cache_dir: Path) -> Path:
    """The cached tiny SDXL folder (``cache_dir/models/tiny-sdxl-v1``), built once; race-safe.

    Raises:
        RuntimeError: the target exists but is not a complete model folder.
    """
    dest = Path(cache_dir) / "models" / _CACHE_SUBDIR
    marker = dest / "model_index.json"
    if marker.is_file():
        return dest
    tmp = _build_in_temp_dir(dest.parent, dest.name, seed=0)
    try:
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; same content
    if not marker.is_file():
        raise RuntimeError(f"{dest} exists but is not a complete tiny model; delete it and retry")
    return dest
