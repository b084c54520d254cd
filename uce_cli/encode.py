"""Prompts → text-encoder hidden states, each unique prompt once, batched, and the token positions
each alignment mode uses (docs/design.md).

Prompts are padded to ``model_max_length`` and the encoder runs without an attention mask, as the
Stable Diffusion pipelines do. ``f(x) = n_tokens(x) − 2`` is the index of the last word token
(0, the BOS position, for ``""``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from uce_cli.errors import UceError
from uce_cli.progress import NullProgress, Progress


@dataclass(frozen=True)
class Span:
    """Positions ``start … start+length−1`` of one prompt's hidden states."""

    prompt: str
    start: int
    length: int


def token_counts(tokenizer: object, prompts: list[str]) -> dict[str, int]:
    """Number of tokens of each prompt including BOS and EOS, without truncation."""
    ids = tokenizer(prompts, truncation=False, padding=False)["input_ids"]
    return {p: len(i) for p, i in zip(prompts, ids, strict=True)}


def check_lengths(counts: dict[str, int], max_length: int, where: dict[str, str]) -> None:
    """Refuse prompts longer than the encoder reads.

    Truncation would silently move the "last word token" the edit is anchored on, so uce
    refuses instead and names the prompt.
    """
    too_long = [(p, n) for p, n in counts.items() if n > max_length]
    if too_long:
        prompt, n = too_long[0]
        more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise UceError(
            f"{where.get(prompt, 'recipe')}: prompt '{shown}' has {n} tokens, more than the text "
            f"encoder's {max_length}{more} — shorten it (uce refuses rather than truncating, which "
            "would move the token the edit is anchored on)"
        )


def last_word_index(n_tokens: int) -> int:
    """f(x): index of the last word token; BOS (0) for the empty prompt."""
    return n_tokens - 2


def paper_spans(
    source: str, targets: list[str], counts: dict[str, int], max_length: int
) -> tuple[Span, list[Span]]:
    """Paper alignment: K = L − max f over the pair; last word ↔ last word, EOS ↔ EOS, pad ↔ pad."""
    f_source = last_word_index(counts[source])
    f_targets = [last_word_index(counts[t]) for t in targets]
    k = max_length - max([f_source, *f_targets])
    return Span(source, f_source, k), [
        Span(t, f, k) for t, f in zip(targets, f_targets, strict=True)
    ]


def last_token_spans(
    source: str, targets: list[str], counts: dict[str, int]
) -> tuple[Span, list[Span]]:
    """last-token alignment: one vector per prompt, at its last word token."""
    return (
        Span(source, last_word_index(counts[source]), 1),
        [Span(t, last_word_index(counts[t]), 1) for t in targets],
    )


@torch.inference_mode()
def encode_batches(
    tokenizer: object,
    encoder: torch.nn.Module,
    prompts: list[str],
    batch_size: int = 32,
    progress: Progress | None = None,
    padding: str = "max_length",
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield ``(prompts, hidden)`` per batch; hidden is ``(B, L, d)`` on the encoder's device.

    Args:
        tokenizer: the pipeline's CLIP tokenizer.
        encoder: the text encoder; ``encoder(ids)[0]`` is what the UNet is conditioned on.
        prompts: unique prompts to encode.
        batch_size: prompts per forward pass.
        progress: receives one advance per prompt.
        padding: ``max_length`` (L = model_max_length, what the pipelines condition on) or
            ``longest`` (L = the batch's longest prompt; exact for positions before it, since the
            CLIP text encoder is causal).
    """
    progress = progress or NullProgress()
    device = next(encoder.parameters()).device
    max_length = tokenizer.model_max_length
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        ids = tokenizer(
            batch, padding=padding, max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        hidden = encoder(ids)[0]  # (B, L, d); no attention mask, as the SD pipelines run it
        yield batch, hidden
        progress.advance(len(batch))
