"""What FLUX.1 and SD3 share: joint-attention transformers whose only text-only linear maps are the
text stream's input projections, ``context_embedder`` (the token sequence) and
``time_text_embed.text_embedder.linear_1`` (the pooled vector).

There is no cross-attention in these models: text and image tokens attend to each other in joint
blocks, so the k/v projections of those blocks read a mix of text and image. uce edits the two
input projections instead — the same closed form on a linear map whose input is a fixed function
of the prompt. Only their ``.weight`` is edited; the bias is untouched and every target is
``W_old·c*`` (the bias cancels: ``W_new c + b ≈ W_old c* + b``), unlike the 2025 upstream code,
which put ``W_old c* + b`` in the targets and so shifted every output by ``b`` once more.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from uce_cli.errors import ModelError, UceError
from uce_cli.families.base import Family
from uce_cli.weights.files import read_json_config, weight_files

CONTEXT_KEY = "context_embedder.weight"
POOLED_KEY = "time_text_embed.text_embedder.linear_1.weight"
# What ``layers.projections`` filters on, per editable key.
PROJECTIONS = {CONTEXT_KEY: "context_embedder", POOLED_KEY: "text_embedder"}


def check_prompt_lengths(
    counts: dict[str, int], max_length: int, tokenizer: str, padded_to: str
) -> None:
    """Refuse a prompt longer than a tokenizer's padded length (truncation moves the anchor).

    Raises:
        UceError: naming the prompt, its token count and the tokenizer.
    """
    too_long = [(p, n) for p, n in counts.items() if n > max_length]
    if too_long:
        prompt, n = too_long[0]
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
        raise UceError(
            f"prompt '{shown}' has {n} tokens in {tokenizer}, more than the {max_length} the "
            f"pipeline {padded_to}{more} — shorten it (uce refuses rather than truncating, which "
            "would move the token the edit is anchored on)"
        )


class JointFamily(Family):
    """A joint-attention pipeline whose editable weights are the text input projections."""

    edits: ClassVar[str] = (
        "text input projections (context_embedder and the pooled text projection), "
        "not attention keys/values"
    )
    denoiser: ClassVar[str] = "transformer"
    cuda_dtype: ClassVar[str] = "bf16"  # T5-XXL overflows in fp16
    components: ClassVar[tuple[str, ...]]  # folders the family needs, besides the transformer
    text_encoders: ClassVar[tuple[str, ...]]  # the components whose weights make the vectors
    sequence_group: ClassVar[str]  # name of the group context_embedder reads
    transformer_class: ClassVar[str]  # the diffusers class of its transformer

    def check_components(self) -> None:
        """Refuse a folder whose transformer is not the family's, or that lacks a component the
        edit or ``uce sample`` reads.

        Raises:
            ModelError: naming the folder and the wrong or first missing component.
        """
        from uce_cli.families import supported

        entry = self.index.get("transformer")
        named = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if named is not None and named != self.transformer_class:
            raise ModelError(
                f"{self.root}: model_index.json names a {self.index.get('_class_name')} whose "
                f"transformer is a {named}, not a {self.transformer_class} — not a {self.label} "
                f"pipeline uce can edit; {supported()}"
            )
        for name in ("transformer", *self.components):
            if name not in self.index or not (self.root / name).is_dir():
                raise ModelError(
                    f"{self.root}: the {self.label} pipeline has no '{name}' component (listed in "
                    "model_index.json and present as a folder) — download the complete model"
                )

    def group_of(self, key: str) -> tuple[str, str] | None:
        """``context_embedder.weight`` → the sequence group; the pooled linear_1 → ``pooled``."""
        if key == CONTEXT_KEY:
            return self.sequence_group, PROJECTIONS[key]
        if key == POOLED_KEY:
            return "pooled", PROJECTIONS[key]
        return None

    def transformer_config(self) -> dict:
        """The transformer's config.json."""
        return read_json_config(self.root / "transformer" / "config.json")

    def order(self, key: str) -> tuple:
        """The sequence projection first, then the pooled one."""
        return (0 if key == CONTEXT_KEY else 1, key)

    def text_encoder_files(self) -> list[Path]:
        """Every text encoder's safetensors files (sharded ones through their index)."""
        return [f for name in self.text_encoders for f in weight_files(self.root / name, "model")]


__all__ = [
    "CONTEXT_KEY",
    "POOLED_KEY",
    "PROJECTIONS",
    "JointFamily",
    "check_prompt_lengths",
]
