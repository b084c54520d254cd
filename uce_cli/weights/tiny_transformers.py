"""Build tiny, seeded PixArt-α, PixArt-Σ and Sana pipelines (T5/Gemma text encoders, transformer
denoisers) from configs, with tokenizers generated offline, for tests that load them through
``from_pretrained`` as real folders are loaded. Their images are noise; their data flow is real."""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from uce_cli.weights.destination import apply_default_modes
from uce_cli.weights.tiny import _TRAINING_WORDS, _seeded

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import GemmaTokenizer, T5Tokenizer

__all__ = [
    "build_tiny_gemma_tokenizer",
    "build_tiny_pixart",
    "build_tiny_sana",
    "build_tiny_t5_tokenizer",
    "write_tiny_transformer_model",
]

# Every character a prompt may use maps to a piece, so no word ever becomes <unk>.
_CHARS = string.ascii_letters + string.digits + string.punctuation
_META = "▁"  # SentencePiece's word-start marker, used by both T5 and Gemma

# The T5 width and caption projection are shared by α and Σ; Σ differs in max length (300).
_T5_WIDTH = 32
_PIXART_HEADS, _PIXART_HEAD_DIM = 3, 8  # inner dim 24: what attn2.to_k/to_v read
_GEMMA_WIDTH = 16
_SANA_HEADS, _SANA_HEAD_DIM = 2, 8  # inner dim 16


def build_tiny_t5_tokenizer(max_length: int = 120) -> T5Tokenizer:
    """A real T5 (Unigram) tokenizer with T5's special ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2.

    Template words are single pieces ("▁painting"); unseen words split into characters, as
    rare names do in the real 32k vocabulary. No BOS; ``</s>`` is appended to every prompt.
    """
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab.append((_META, -2.0))
    # Unigram picks the segmentation of highest total log-probability: whole words beat letters.
    vocab += [(_META + w, -3.0) for w in sorted(set(_TRAINING_WORDS))]
    vocab += [(c, -8.0) for c in _CHARS] + [(_META + c, -9.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _gemma_merges(words: list[str]) -> list[tuple[str, str]]:
    """Deterministic BPE merges that make each ``▁word`` one token (left to right)."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        symbols = [_META + word[0], *word[1:]]
        left = symbols[0]
        if (_META, word[0]) not in seen:
            seen.add((_META, word[0]))
            merges.append((_META, word[0]))
        for right in symbols[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left += right
    return merges


def build_tiny_gemma_tokenizer() -> GemmaTokenizer:
    """A real Gemma (byte-fallback BPE) tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2 prepended
    to every prompt, no EOS appended, as Gemma 2's tokenizer does; template words are one token.
    No ``model_max_length`` (Gemma's is unbounded): Sana's instruction alone is longer than 300."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for byte in range(256):  # byte fallback: any character outside the vocab still encodes
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in _META + _CHARS:
        vocab.setdefault(char, len(vocab))
    merges = _gemma_merges(sorted(set(_TRAINING_WORDS)))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def build_tiny_pixart(seed: int = 0, sigma: bool = False) -> DiffusionPipeline:
    """A tiny PixArt-α (or, with ``sigma``, PixArt-Σ) pipeline on CPU.

    Shapes follow the real models scaled down: T5 v1.1 (gated-GELU) encoder → caption projection
    (32 → 24) → two transformer blocks whose ``attn2`` read the 24-d projected captions.
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_t5_tokenizer(300 if sigma else 120)
    with _seeded(seed):
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=_T5_WIDTH,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
    inner = _PIXART_HEADS * _PIXART_HEAD_DIM
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=_PIXART_HEAD_DIM,
            num_attention_heads=_PIXART_HEADS,
            caption_channels=_T5_WIDTH,
            in_channels=4,
            cross_attention_dim=inner,
            out_channels=8,  # learned sigma, as the real models
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
        )
    with _seeded(seed):
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 32, 32),  # scale factor 8, as the real VAE
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
        )
    pipeline_class = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def build_tiny_sana(seed: int = 0) -> DiffusionPipeline:
    """A tiny Sana pipeline on CPU: Gemma 2 encoder (16-d) → caption projection → RMS caption
    norm → two linear-attention blocks whose ``attn2`` read the 16-d normed captions."""
    from diffusers import (
        AutoencoderDC,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_tiny_gemma_tokenizer()
    with _seeded(seed):
        text_encoder = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tokenizer),
                hidden_size=_GEMMA_WIDTH,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    inner = _SANA_HEADS * _SANA_HEAD_DIM
    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=_SANA_HEADS,
            attention_head_dim=_SANA_HEAD_DIM,
            num_layers=2,
            num_cross_attention_heads=_SANA_HEADS,
            cross_attention_head_dim=_SANA_HEAD_DIM,
            cross_attention_dim=inner,
            caption_channels=_GEMMA_WIDTH,
            sample_size=16,  # × the DC-AE's factor 2 = 32 px, the smallest size Sana accepts
            patch_size=1,
        )
    with _seeded(seed):
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def write_tiny_transformer_model(dest: Path, kind: str, seed: int = 0) -> Path:
    """Write a tiny ``kind`` ("pixart-alpha", "pixart-sigma", "sana") pipeline folder at ``dest``.

    Built in a sibling temp folder and renamed into place, so ``dest`` is absent or complete.

    Raises:
        ValueError: an unknown ``kind``.
        FileExistsError: ``dest`` exists and is not an empty folder.
    """
    builders = {
        "pixart-alpha": lambda: build_tiny_pixart(seed),
        "pixart-sigma": lambda: build_tiny_pixart(seed, sigma=True),
        "sana": lambda: build_tiny_sana(seed),
    }
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind '{kind}' — one of {', '.join(builders)}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        builders[kind]().save_pretrained(tmp, safe_serialization=True)
        apply_default_modes(tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.exists():
            raise FileExistsError(f"refusing to overwrite existing path: {dest}") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
