"""The CLIP text encoders' engine: token counts and hidden states, as the Stable Diffusion pipelines
compute them (pad to ``model_max_length``, no attention mask), for every family with a CLIP encoder.

``f(x) = n_tokens(x) − 2`` is the index of the last word token (0, the BOS position, for ``""``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from uce_cli.progress import NullProgress, Progress


def token_counts(tokenizer: object, prompts: list[str]) -> dict[str, int]:
    """Number of tokens of each prompt including BOS and EOS, without truncation."""
    ids = tokenizer(prompts, truncation=False, padding=False)["input_ids"]
    return {p: len(i) for p, i in zip(prompts, ids, strict=True)}


def last_word_index(n_tokens: int) -> int:
    """f(x): index of the last word token; BOS (0) for the empty prompt."""
    return n_tokens - 2


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
