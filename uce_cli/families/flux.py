"""FLUX.1 (``FluxPipeline``): prompts → the T5 sequence ``context_embedder`` reads and the CLIP pooled
vector the pooled text projection reads; the editable weights are those two projections.

What the pipeline feeds its transformer (diffusers ``FluxPipeline.encode_prompt``):

- ``t5``: T5-XXL's last hidden states (``text_encoder_2``), the prompt padded with ``<pad>`` to
  ``max_sequence_length`` = 512 (the pipeline's default) and encoded without an attention mask;
  the transformer receives no mask either, so every one of the 512 positions is seen.
  T5 appends ``</s>`` and has no BOS: the last word token is the piece before ``</s>``
  (index n − 2); for ``""``, whose only token is ``</s>``, it is position 0 (``</s>`` itself).
- ``pooled``: CLIP-L's pooled output (``text_encoder``, the EOS position of a 77-token prompt),
  one vector per prompt: last_word 0, seen 1. A prompt over 77 CLIP tokens is truncated, as the
  pipeline truncates it (the pooled vector has no anchor position); over 512 T5 tokens, refused.

See ``uce_cli.families.joint`` for why these projections, and for the bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from uce_cli.errors import ModelError
from uce_cli.families.base import Group, TextPath, Tokens
from uce_cli.families.joint import JointFamily

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s default (FLUX.1-schnell users often pass 256)
CLIP_LENGTH = 77


def t5_last_word(n_tokens: int) -> int:
    """Index of the last word piece of a T5 prompt of ``n_tokens`` (with ``</s>``); 0 for ``""``."""
    return max(n_tokens - 2, 0)


def token_counts(tokenizer: object, prompts: Sequence[str]) -> dict[str, int]:
    """Tokens of each prompt with its special tokens, untruncated."""
    ids = tokenizer(list(prompts), truncation=False, padding=False)["input_ids"]
    return {p: len(i) for p, i in zip(prompts, ids, strict=True)}


def load_tokenizer(folder: Path) -> object:
    """A tokenizer folder through ``AutoTokenizer`` (as the pipeline's loader does).

    Raises:
        ModelError: the folder cannot be read as a tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError/ValueError/… on broken folders
        raise ModelError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def load_encoder(
    cls: type, folder: Path, device: torch.device, dtype: torch.dtype | None
) -> object:
    """A text encoder from safetensors, on ``device`` in eval mode.

    Raises:
        ModelError: the folder cannot be loaded.
    """
    try:
        encoder = cls.from_pretrained(str(folder), use_safetensors=True, dtype=dtype)
    except Exception as exc:
        raise ModelError(f"cannot load the text encoder in {folder}: {exc}") from exc
    return encoder.to(device).eval().requires_grad_(False)


class FluxTextPath(TextPath):
    """FLUX.1's two text inputs: the T5 sequence (``t5``) and the CLIP pooled vector (``pooled``)."""

    # T5's 512 bind: CLIP is truncated to 77 as the pipeline truncates it — the pooled vector
    # has no anchor position to move, and uce's vector stays the one the pipeline feeds.
    max_tokens = MAX_SEQUENCE_LENGTH

    def __init__(
        self,
        root: Path,
        groups: tuple[Group, ...],
        device: torch.device | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.groups = groups
        self.tokenizer = load_tokenizer(root / "tokenizer")
        self.tokenizer_2 = load_tokenizer(root / "tokenizer_2")
        self.clip = self.t5 = None
        if device is not None:
            from transformers import CLIPTextModel, T5EncoderModel

            self.clip = load_encoder(CLIPTextModel, root / "text_encoder", device, dtype)
            self.t5 = load_encoder(T5EncoderModel, root / "text_encoder_2", device, dtype)

    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        """``t5``: last word piece before ``</s>``, all 512 positions seen; ``pooled``: one vector.

        ``n_tokens`` is T5's count for ``t5`` and CLIP's (untruncated) for ``pooled``; the caller
        refuses a prompt over ``max_tokens`` (512).
        """
        clip = token_counts(self.tokenizer, prompts)
        t5 = token_counts(self.tokenizer_2, prompts)
        return {
            "t5": {p: Tokens(t5[p], t5_last_word(t5[p]), MAX_SEQUENCE_LENGTH) for p in prompts},
            "pooled": {p: Tokens(clip[p], 0, 1) for p in prompts},
        }

    @torch.inference_mode()
    def encode(
        self, prompts: Sequence[str], padding: str = "max_length"
    ) -> dict[str, torch.Tensor]:
        """``t5``: (B, 512, d_t5); ``pooled``: (B, 1, d_clip) — as ``FluxPipeline.encode_prompt``.

        ``padding`` is ignored: T5 is not causal, so its vectors depend on the padding; they are
        always computed at the pipeline's 512 tokens.
        """
        if self.clip is None or self.t5 is None:
            raise ModelError("the FLUX text path was opened without encoders (tokenizers only)")
        prompts = list(prompts)
        ids_2 = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = self.t5.device
        t5 = self.t5(ids_2.to(device), output_hidden_states=False)[0].to(self.t5.dtype)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.clip(ids.to(self.clip.device), output_hidden_states=False).pooler_output
        return {"t5": t5, "pooled": pooled.to(self.clip.dtype).unsqueeze(1)}

    def release(self) -> None:
        """Drop both encoders."""
        self.clip = self.t5 = None


class FluxFamily(JointFamily):
    """FLUX.1 [dev] / [schnell]: ``FluxPipeline`` folders."""

    name = "flux"
    label = "FLUX.1"
    pipelines: ClassVar[str] = "FLUX.1 pipelines (FluxPipeline: its text input projections)"
    pipeline_prefixes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    width_checks = (
        (("text_encoder_2",), "hidden", "joint_attention_dim"),  # T5 sequence
        (("text_encoder",), "hidden", "pooled_projection_dim"),  # CLIP pooled output
    )
    components: ClassVar[tuple[str, ...]] = (
        "scheduler",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    )
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    sequence_group: ClassVar[str] = "t5"
    transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    negative_prompt: ClassVar[bool] = False  # guidance is distilled (guidance_scale embedding)

    @classmethod
    def claims(cls, index: dict) -> bool:
        """Exactly ``FluxPipeline`` (Fill, Kontext, ControlNet … are other pipelines)."""
        return index.get("_class_name") == "FluxPipeline"

    def groups(self) -> tuple[Group, ...]:
        """``t5`` (joint_attention_dim, 4096) and ``pooled`` (pooled_projection_dim, 768)."""
        config = self.transformer_config()
        return (
            Group(
                "t5",
                int(config.get("joint_attention_dim", 4096)),
                "T5 hidden states (text_encoder_2, 512 tokens), the input of context_embedder",
            ),
            Group(
                "pooled",
                int(config.get("pooled_projection_dim", 768)),
                "CLIP pooled output (text_encoder), the input of time_text_embed.text_embedder",
            ),
        )

    def text_path(self, device: torch.device | None, dtype: torch.dtype | None) -> TextPath:
        """Both tokenizers, and both encoders when ``device`` is given."""
        return FluxTextPath(self.root, self.groups(), device, dtype)
