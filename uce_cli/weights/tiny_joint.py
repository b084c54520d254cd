"""Build tiny, seeded FLUX.1- and SD3-shaped pipelines (joint-attention transformers with CLIP and
T5 text encoders) whose diffusers folders load through ``from_pretrained`` like real ones.

Their images are noise; what matters is the layout and the text path: real ``FluxPipeline`` /
``StableDiffusion3Pipeline`` classes, a real T5 Unigram tokenizer generated offline (no
sentencepiece), and each width distinct so a mixed-up group shows as a shape error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from uce_cli.weights.destination import apply_default_modes
from uce_cli.weights.tiny import (
    _TRAINING_WORDS,
    _seeded,
    _write_sd_tokenizer_files,
    build_tiny_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from transformers import T5TokenizerFast

__all__ = [
    "FLUX_WIDTHS",
    "SD3_WIDTHS",
    "build_tiny_flux",
    "build_tiny_sd3",
    "build_tiny_t5_tokenizer",
    "write_tiny_joint",
]

# FLUX: T5 d_model (context_embedder's d_in) ≠ CLIP width (the pooled projection's d_in).
FLUX_WIDTHS = {"t5": 48, "pooled": 32}
# SD3: CLIP-L 32 ‖ CLIP-G 40 (hidden and projection) = 72, zero-padded to T5's 80 in the sequence.
SD3_WIDTHS = {"clip_l": 32, "clip_g": 40, "t5": 80, "pooled": 72}
_T5_MAX_LENGTH = 512  # what the real FLUX/SD3 T5 tokenizers declare (model_max_length)


def build_tiny_t5_tokenizer() -> T5TokenizerFast:
    """A real T5 Unigram tokenizer (``</s>`` appended, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).

    Template and subject words are one piece each (``▁painting``); every printable ASCII
    character is a piece too, so unseen words such as artist names split into several pieces and
    never into ``<unk>`` — as in the real T5 vocabulary.
    """
    from transformers import T5TokenizerFast

    words = sorted(set(_TRAINING_WORDS))
    chars = [chr(c) for c in range(33, 127)]
    # Unigram picks the segmentation with the highest total score: whole words (−1) beat their
    # characters (−6 each), and "▁" (−4) starts an unseen word.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [(f"▁{w}", -1.0) for w in words] + [(c, -6.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int, seed: int) -> object:
    from transformers import T5Config, T5EncoderModel

    with _seeded(seed):
        return T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=d_model,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )


def _clip_config(tokenizer: object, width: int) -> object:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(seed: int) -> object:
    from diffusers import AutoencoderKL

    # Two blocks: a VAE scale factor of 2, one latent channel → the transformer's 4 packed channels.
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=1,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )


def build_tiny_flux(seed: int = 0) -> FluxPipeline:
    """The tiny FLUX.1-dev-shaped pipeline (guidance-distilled: ``guidance_embeds=True``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, FLUX_WIDTHS["pooled"]))
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=FLUX_WIDTHS["t5"],
            pooled_projection_dim=FLUX_WIDTHS["pooled"],
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, FLUX_WIDTHS["t5"], seed),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """The tiny SD3-shaped pipeline: CLIP-L and CLIP-G with projection, T5, an MMDiT."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    tokenizer_2.pad_token = "!"  # as SD3's CLIP-G tokenizer: pads with "!", not with EOS
    tokenizer_3 = build_tiny_t5_tokenizer()
    with _seeded(seed):
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, SD3_WIDTHS["clip_l"]))
    with _seeded(seed + 1):
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_config(tokenizer_2, SD3_WIDTHS["clip_g"])
        )
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=1,
            in_channels=1,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=SD3_WIDTHS["t5"],
            caption_projection_dim=32,
            pooled_projection_dim=SD3_WIDTHS["pooled"],
            out_channels=1,
            pos_embed_max_size=32,
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, SD3_WIDTHS["t5"], seed),
        tokenizer_3=tokenizer_3,
    )


def write_tiny_joint(kind: str, dest: Path, seed: int = 0) -> Path:
    """Write the tiny ``flux`` or ``sd3`` pipeline as a diffusers folder at ``dest`` (atomically).

    CLIP tokenizer folders are laid out as in the real repositories (``vocab.json`` and
    ``merges.txt``, no ``tokenizer.json``); the T5 tokenizer keeps its ``tokenizer.json``.

    Raises:
        ValueError: an unknown kind.
        FileExistsError: ``dest`` exists and is not an empty directory.
    """
    builders = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
    if kind not in builders:
        raise ValueError(f"unknown tiny joint-attention model {kind!r}: flux or sd3")
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise FileExistsError(f"refusing to overwrite existing path: {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        builders[kind](seed).save_pretrained(tmp, safe_serialization=True)
        clip_folders = ["tokenizer"] if kind == "flux" else ["tokenizer", "tokenizer_2"]
        for name in clip_folders:
            _write_sd_tokenizer_files(tmp / name)
        apply_default_modes(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
