"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): prompts → the joint sequence
``context_embedder`` reads and the pooled vector the pooled text projection reads.

What the pipeline feeds its transformer (diffusers ``StableDiffusion3Pipeline.encode_prompt``):

- ``joint``: 77 CLIP positions — CLIP-L's ‖ CLIP-G's penultimate hidden states (768 + 1280 =
  2048), zero-padded to T5's width (4096) — followed by T5-XXL's 256 positions
  (``max_sequence_length`` = 256, the pipeline's default), 333 positions in all, none masked.
  The last word token is the CLIP one (index n − 2 of CLIP-L's tokens, 0 for ``""``; CLIP-G
  uses the same BPE and only pads with ``!``), so ``paper`` mode pairs the CLIP positions from the
  last word through the CLIP padding exactly as on SD 1.x, then every T5 position of the source
  with the target's T5 positions shifted by the two prompts' difference in CLIP last-word index;
  ``last-token`` reads the CLIP last word only, leaving the T5 positions to the preserve term.
- ``pooled``: CLIP-L's ‖ CLIP-G's projected pooled outputs (768 + 1280 = 2048), one per prompt.

See ``uce_cli.families.joint`` for why these projections, and for the bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from uce_cli.errors import ModelError
from uce_cli.families.base import Group, TextPath, Tokens
from uce_cli.families.flux import CLIP_LENGTH, load_encoder, load_tokenizer, token_counts
from uce_cli.families.joint import JointFamily, check_prompt_lengths

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default


class SD3TextPath(TextPath):
    """SD3's two text inputs: the CLIP ‖ T5 sequence (``joint``) and the pooled vector (``pooled``)."""

    max_tokens = CLIP_LENGTH

    def __init__(
        self,
        root: Path,
        groups: tuple[Group, ...],
        device: torch.device | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.groups = groups
        self.tokenizers = [load_tokenizer(root / n) for n in ("tokenizer", "tokenizer_2")]
        self.tokenizer_3 = load_tokenizer(root / "tokenizer_3")
        self.clips: list[object] = []
        self.t5 = None
        if device is not None:
            from transformers import CLIPTextModelWithProjection, T5EncoderModel

            self.clips = [
                load_encoder(CLIPTextModelWithProjection, root / n, device, dtype)
                for n in ("text_encoder", "text_encoder_2")
            ]
            self.t5 = load_encoder(T5EncoderModel, root / "text_encoder_3", device, dtype)

    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        """``joint``: the CLIP last word, all 77 + 256 positions seen; ``pooled``: one vector.

        ``n_tokens`` is the longer CLIP count (the caller refuses it over ``max_tokens``, 77: the
        anchor is a CLIP position); a prompt over T5's 256 tokens is refused here.

        Raises:
            UceError: a prompt over 256 T5 tokens, naming it and the tokenizer.
        """
        clip = token_counts(self.tokenizers[0], prompts)
        clip_g = token_counts(self.tokenizers[1], prompts)
        clip = {p: max(clip[p], clip_g[p]) for p in prompts}
        t5 = token_counts(self.tokenizer_3, prompts)
        check_prompt_lengths(t5, MAX_SEQUENCE_LENGTH, "the T5 tokenizer (tokenizer_3)", "pads to")
        seen = CLIP_LENGTH + MAX_SEQUENCE_LENGTH
        return {
            "joint": {p: Tokens(clip[p], max(clip[p] - 2, 0), seen) for p in prompts},
            "pooled": {p: Tokens(clip[p], 0, 1) for p in prompts},
        }

    @torch.inference_mode()
    def encode(
        self, prompts: Sequence[str], padding: str = "max_length"
    ) -> dict[str, torch.Tensor]:
        """``joint``: (B, 333, d_t5); ``pooled``: (B, 1, d_L + d_G) — as the pipeline's encode_prompt.

        ``padding`` is ignored: the sequence always has the pipeline's 77 + 256 positions.
        """
        if not self.clips or self.t5 is None:
            raise ModelError("the SD3 text path was opened without encoders (tokenizers only)")
        prompts = list(prompts)
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers, self.clips, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=CLIP_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            # The pipeline casts both CLIP outputs to the first encoder's dtype.
            hidden.append(out.hidden_states[-2].to(self.clips[0].dtype))
            pooled.append(out[0])
        ids_3 = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        t5 = self.t5(ids_3.to(self.t5.device))[0].to(self.t5.dtype)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "joint": torch.cat([clip, t5], dim=-2),
            "pooled": torch.cat(pooled, dim=-1).unsqueeze(1),
        }

    def release(self) -> None:
        """Drop the three encoders."""
        self.clips, self.t5 = [], None


class SD3Family(JointFamily):
    """Stable Diffusion 3 / 3.5: ``StableDiffusion3Pipeline`` folders with all three encoders."""

    name = "sd3"
    label = "Stable Diffusion 3"
    pipelines: ClassVar[str] = (
        "Stable Diffusion 3 pipelines (StableDiffusion3Pipeline: its text input projections)"
    )
    pipeline_prefixes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    width_checks = (
        (("text_encoder_3",), "hidden", "joint_attention_dim"),  # T5 sequence (CLIP padded to it)
        (("text_encoder", "text_encoder_2"), "projection", "pooled_projection_dim"),
    )
    components: ClassVar[tuple[str, ...]] = (
        "scheduler",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    )
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    sequence_group: ClassVar[str] = "joint"
    transformer_class: ClassVar[str] = "SD3Transformer2DModel"

    @classmethod
    def claims(cls, index: dict) -> bool:
        """Exactly ``StableDiffusion3Pipeline`` (img2img, inpaint, ControlNet are other pipelines)."""
        return index.get("_class_name") == "StableDiffusion3Pipeline"

    def groups(self) -> tuple[Group, ...]:
        """``joint`` (joint_attention_dim, 4096) and ``pooled`` (pooled_projection_dim, 2048)."""
        config = self.transformer_config()
        return (
            Group(
                "joint",
                int(config.get("joint_attention_dim", 4096)),
                "77 CLIP-L‖CLIP-G penultimate positions (zero-padded) then 256 T5 positions, "
                "the input of context_embedder",
            ),
            Group(
                "pooled",
                int(config.get("pooled_projection_dim", 2048)),
                "CLIP-L‖CLIP-G projected pooled outputs, the input of time_text_embed.text_embedder",
            ),
        )

    def text_path(self, device: torch.device | None, dtype: torch.dtype | None) -> TextPath:
        """The three tokenizers, and the three encoders when ``device`` is given."""
        return SD3TextPath(self.root, self.groups(), device, dtype)
