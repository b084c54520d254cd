"""The Sana family: a Gemma 2 encoder, prompted with the pipeline's complex human instruction,
whose masked hidden states pass through the transformer's ``caption_projection`` and
``caption_norm``; every block's ``attn2`` reads that normed projection.

Data flow, as diffusers 0.42 runs it (``SanaPipeline.encode_prompt`` with ``__call__``'s defaults
→ ``SanaTransformer2DModel.forward``): the prompt is lowercased and stripped, the instruction
(``complex_human_instruction``, joined by newlines; read from the installed diffusers) is put in
front, Gemma's tokenizer adds ``<bos>`` (no EOS) and pads on the right to n_instr + 300 − 2
tokens (n_instr: the instruction's own token count) with a mask; Gemma 2 runs with that mask;
then only position 0 and the last 299 positions are kept (``select_index``): ``<bos>`` followed
by the prompt's tokens (the instruction's trailing "▁" is where the prompt's first word merges)
and the padding. The transformer applies ``caption_projection`` then ``caption_norm`` (RMS) and
hands the result to every block's ``attn2``, padded keys masked with a −10000 bias.

Tokens: ``seen`` = the unmasked kept positions (``<bos>`` + the prompt's tokens); ``last_word`` =
seen − 1, the prompt's last token (Gemma appends no EOS). For ``""`` the kept tokens are ``<bos>``
and the instruction's last token, so last_word = 1: the position that has read the whole
instruction, as a last word has read the whole prompt. ``n_tokens`` counts the same way,
untruncated, so a prompt is refused when it would be cut (> 300).

The unconditional branch is encoded *without* the instruction (``""`` → ``<bos>`` alone). Gemma is
causal, so that ``<bos>`` vector is position 0 of every prompt: preserving any prompt in
``paper`` mode preserves it. uce encodes every recipe prompt, ``""`` included, the way the
pipeline encodes ``prompt=``: with the instruction.

Outputs: ``SanaPipeline`` has ``load_lora_weights`` (``transformer.`` keys). The original Sana
single-file layout fuses k and v into one ``kv_linear`` and holds tensors a diffusers folder does
not (``pos_embed``, ``y_embedder.y_embedding``), so uce writes no single file for Sana.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from uce_cli.errors import ModelError
from uce_cli.families.base import Group, TextPath, Tokens
from uce_cli.families.pixart import (
    CaptionFamily,
    CaptionPath,
    call_default,
    load_projection,
    preprocess,
    read_denoiser_tensors,
)

if TYPE_CHECKING:
    import torch


class SanaPath(CaptionPath):
    """Prompts → ``caption_norm(caption_projection(Gemma 2 hidden states))`` at the kept positions."""

    def __init__(
        self,
        group: Group,
        tokenizer: Any,
        max_length: int,
        instruction: str,
        encoder: torch.nn.Module | None = None,
        projection: torch.nn.Module | None = None,
        norm: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(group, tokenizer, max_length, encoder, projection)
        tokenizer.padding_side = "right"  # as encode_prompt sets it
        self.instruction = instruction
        self.norm = norm
        n_instr = len(tokenizer.encode(instruction)) if instruction else 0
        # the pipeline's arithmetic: all tokens, then <bos> and the last max_length − 1 kept
        self.offset = n_instr - 2 if instruction else 0  # tokens before the kept tail, less <bos>
        self.full_length = max_length + self.offset
        self.keep = [0, *range(self.full_length - max_length + 1, self.full_length)]

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Untruncated ids of instruction + prompt (the instruction's tokens counted too)."""
        texts = [self.instruction + preprocess(p) for p in prompts]
        return self.tokenizer(texts, truncation=False, padding=False)["input_ids"]

    def last_word(self, seen: int) -> int:
        """The last kept unmasked position (Gemma adds no EOS)."""
        return seen - 1

    def tokens(self, prompts: Sequence[str]) -> dict[str, dict[str, Tokens]]:
        """group → prompt → Tokens, counted on the kept positions (instruction tail dropped)."""
        out: dict[str, Tokens] = {}
        for prompt, ids in zip(prompts, self.token_ids(prompts), strict=True):
            n_tokens = len(ids) - self.offset
            seen = min(n_tokens, self.max_tokens)
            out[prompt] = Tokens(n_tokens=n_tokens, last_word=self.last_word(seen), seen=seen)
        return {self.groups[0].name: out}

    def model_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) over the full instruction + prompt length (B, L_all)."""
        batch = self.tokenizer(
            [self.instruction + preprocess(p) for p in prompts],
            padding="max_length",
            max_length=self.full_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L_all, d_text) → keep <bos> and the tail → projection → RMS norm: (B, L, inner)."""
        return self.norm(self.projection(hidden[:, self.keep]))

    def release(self) -> None:
        """Drop the encoder, projection and norm weights."""
        super().release()
        self.norm = None


def load_caption_norm(
    root: Path, inner: int, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """diffusers' ``RMSNorm`` (eps 1e-5, affine) with the transformer's ``caption_norm`` weight."""
    from diffusers.models.normalization import RMSNorm

    tensors = read_denoiser_tensors(root, "caption_norm.")
    module = RMSNorm(inner, eps=1e-5, elementwise_affine=True)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"{root / 'transformer'}: the caption_norm tensor does not fit width {inner}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class SanaFamily(CaptionFamily):
    """Sana (SanaTransformer2DModel, Gemma 2 2B)."""

    name = "sana"
    label = "Sana"
    pipelines: ClassVar[str] = "Sana pipelines (SanaPipeline)"
    text_tensor_prefixes: ClassVar[tuple[str, ...]] = ("caption_projection.", "caption_norm.")
    pipeline_prefixes: ClassVar[tuple[str, ...]] = ("SanaPipeline",)
    encoder_classes: ClassVar[tuple[str, ...]] = ("Gemma2Model", "Gemma2ForCausalLM")
    reads: ClassVar[str] = "Gemma 2 hidden states (masked) → caption_projection → caption_norm"
    size_multiple: ClassVar[int] = 32  # SanaPipeline.check_inputs: divisible by 32

    @classmethod
    def claims(cls, index: dict[str, Any]) -> bool:
        """Exactly the text-to-image SanaPipeline (not Sprint, PAG or ControlNet)."""
        return str(index.get("_class_name") or "") == "SanaPipeline"

    def defaults(self) -> tuple[int, str]:
        """(max_sequence_length, the instruction joined by newlines): ``__call__``'s defaults."""
        pipeline = self.pipeline_class()
        max_length = int(call_default(pipeline, "max_sequence_length"))
        return max_length, "\n".join(call_default(pipeline, "complex_human_instruction") or [])

    def text_path(self, device: torch.device | None, dtype: torch.dtype | None) -> TextPath:
        """Tokenizer and, with a device, Gemma 2, the caption projection and the caption norm."""
        group = self.groups()[0]
        tokenizer = self.load_tokenizer()
        if device is None:
            return SanaPath(group, tokenizer, *self.defaults())
        encoder = self.load_encoder(device, dtype)
        channels, inner = self.inner_width()
        projection = load_projection(self.root, channels, inner, device, encoder.dtype)
        norm = load_caption_norm(self.root, inner, device, encoder.dtype)
        return SanaPath(group, tokenizer, *self.defaults(), encoder, projection, norm)

    def text_path_of(self, pipe: Any) -> TextPath | None:
        """The loaded pipeline's own tokenizer, Gemma 2, caption projection and caption norm."""
        transformer = pipe.transformer
        return SanaPath(
            self.groups()[0], pipe.tokenizer, *self.defaults(), pipe.text_encoder,
            transformer.caption_projection, transformer.caption_norm,
        )  # fmt: skip
