"""Prompts → the vectors each group's layers read, each unique prompt once, batched through the
family's text path, and the token positions each alignment mode uses (docs/design.md).

The alignment modes are defined on a prompt's :class:`~uce_cli.families.base.Tokens` (where its
last word token is, how many leading positions the denoiser sees):

- ``paper``: K = min over the pair of (seen − last_word); positions last_word … last_word+K−1 pair
  one to one. For CLIP (seen = 77 for every prompt) this is the published K = 77 − max f.
- ``last-token``: one vector per prompt, at last_word.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from uce_cli.errors import UceError
from uce_cli.families.base import TextPath, Tokens
from uce_cli.families.clip import (  # noqa: F401 - the CLIP engine, re-exported
    encode_batches,
    last_word_index,
    token_counts,
)
from uce_cli.progress import NullProgress, Progress


@dataclass(frozen=True)
class Span:
    """Positions ``start … start+length−1`` of one prompt's hidden states."""

    prompt: str
    start: int
    length: int


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


def clip_tokens(counts: dict[str, int], max_length: int) -> dict[str, Tokens]:
    """Tokens of CLIP prompts: the denoiser sees all ``max_length`` positions (it attends to pads)."""
    return {p: Tokens(n, last_word_index(n), max_length) for p, n in counts.items()}


def aligned_spans(
    source: str, targets: list[str], tokens: dict[str, Tokens], alignment: str
) -> tuple[Span, list[Span]]:
    """The spans one edit pair contributes under ``alignment`` (``paper`` | ``last-token``)."""
    if alignment != "paper":
        return (
            Span(source, tokens[source].last_word, 1),
            [Span(t, tokens[t].last_word, 1) for t in targets],
        )
    k = min(tokens[p].seen - tokens[p].last_word for p in [source, *targets])
    return Span(source, tokens[source].last_word, k), [
        Span(t, tokens[t].last_word, k) for t in targets
    ]


def paper_spans(
    source: str, targets: list[str], counts: dict[str, int], max_length: int
) -> tuple[Span, list[Span]]:
    """Paper alignment on CLIP: K = L − max f over the pair; last word ↔ last word, EOS ↔ EOS, pad ↔ pad."""
    return aligned_spans(source, targets, clip_tokens(counts, max_length), "paper")


def last_token_spans(
    source: str, targets: list[str], counts: dict[str, int]
) -> tuple[Span, list[Span]]:
    """last-token alignment on CLIP: one vector per prompt, at its last word token."""
    return aligned_spans(source, targets, clip_tokens(counts, 0), "last-token")


def preserve_rows(hidden: torch.Tensor, tokens: Tokens, alignment: str) -> torch.Tensor:
    """The rows a preserve prompt contributes: positions 0 … seen−1 (paper), or its last word token."""
    if alignment == "paper":
        return hidden[: tokens.seen]
    return hidden[tokens.last_word].unsqueeze(0)


def encode_prompts(
    text_path: TextPath,
    prompts: Sequence[str],
    batch_size: int = 32,
    progress: Progress | None = None,
    padding: str = "max_length",
) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """Yield ``(prompts, {group: (B, L, d)})`` per batch of ``batch_size`` prompts.

    Each prompt goes through the text path once; ``progress`` gets one advance per prompt.
    """
    progress = progress or NullProgress()
    prompts = list(prompts)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        with torch.inference_mode():
            hidden = text_path.encode(batch, padding)
        yield batch, hidden
        progress.advance(len(batch))
