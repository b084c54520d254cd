"""The edit's sufficient statistics: float64 Gram matrices of edit, target and preserve vectors.

Everything the closed form and its diagnostics need is a ``d × d`` matrix (docs/design.md):
``G_s = Σ c_s c_sᵀ``, ``G_ts = Σ c* c_sᵀ``, ``G_t = Σ c* c*ᵀ`` over edit vectors (c* the target
embedding, so v* = W_old c*) and ``G_p = Σ c_p c_pᵀ`` over preserve vectors. They are accumulated
in float64 chunk by chunk while prompts are encoded once, so memory does not grow with the number
of preserve prompts.

Debias prompts whose target is not one fixed linear map of W_old (norm-relative α, or α the debias
loop changes) are kept as ``DebiasBlock``s instead: their ``c cᵀ`` go into ``G_s`` (M does not
depend on α), their targets are built per layer by ``solve.debias_numerator``.

A family's editable layers can read several embeddings (groups, ``uce_cli.families.base``): the
statistics are one ``EditStats`` per group, each from that group's vectors and token positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from uce_cli.edit.cache import PreserveEntry, load_preserve, save_preserve
from uce_cli.edit.encode import Span, aligned_spans, check_lengths, encode_prompts, preserve_rows
from uce_cli.edit.plan import EditPair, EditPlan
from uce_cli.errors import SolveError
from uce_cli.families.base import TextPath, Tokens
from uce_cli.progress import NullProgress, Progress

CHUNK_ROWS = 8192  # vectors per float64 Gram update


@dataclass
class DebiasBlock:
    """One debias prompt's aligned vectors, float64: C (K, d) of the prompt, A (J, K, d) of its
    attribute prompts, and α per attribute; ``preserve_rows`` are the rows the prompt adds when
    it joins the preserve list (all L positions in paper mode, the last word token otherwise)."""

    source: str
    C: torch.Tensor  # (K, d)
    A: torch.Tensor  # (J, K, d)
    alphas: tuple[float, ...]
    relative: bool
    preserve_rows: torch.Tensor  # (L or 1, d)


@dataclass
class EditStats:
    """Float64 Gram statistics of one edit, all ``(d, d)``, plus counts and the spans used."""

    width: int
    G_s: torch.Tensor
    G_ts: torch.Tensor
    G_t: torch.Tensor
    G_p: torch.Tensor
    n_edit_vectors: int = 0
    n_preserve_vectors: int = 0
    spans: list[dict] = field(default_factory=list)
    debias: list[DebiasBlock] = field(default_factory=list)

    @classmethod
    def zeros(cls, width: int, device: torch.device) -> EditStats:
        z = lambda: torch.zeros(width, width, dtype=torch.float64, device=device)  # noqa: E731
        return cls(width, z(), z(), z(), z())


class _GramAccumulator:
    """Buffers row vectors and folds them into float64 Gram sums CHUNK_ROWS at a time."""

    def __init__(self, stats: EditStats) -> None:
        self.stats = stats
        self.sources: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.preserve: list[torch.Tensor] = []

    def add_pair(self, c_s: torch.Tensor, c_t: torch.Tensor) -> None:
        self.sources.append(c_s)
        self.targets.append(c_t)
        if sum(x.shape[0] for x in self.sources) >= CHUNK_ROWS:
            self.flush_pairs()

    def add_preserve(self, c_p: torch.Tensor) -> None:
        self.preserve.append(c_p)
        if sum(x.shape[0] for x in self.preserve) >= CHUNK_ROWS:
            self.flush_preserve()

    def flush_pairs(self) -> None:
        if not self.sources:
            return
        device = self.stats.G_s.device
        c_s = torch.cat(self.sources).to(device, torch.float64)  # (N, d), one row per vector
        c_t = torch.cat(self.targets).to(device, torch.float64)
        self.stats.G_s += c_s.T @ c_s
        self.stats.G_ts += c_t.T @ c_s
        self.stats.G_t += c_t.T @ c_t
        self.stats.n_edit_vectors += c_s.shape[0]
        self.sources, self.targets = [], []

    def flush_preserve(self) -> None:
        if not self.preserve:
            return
        c_p = torch.cat(self.preserve).to(self.stats.G_p.device, torch.float64)
        self.stats.G_p += c_p.T @ c_p
        self.stats.n_preserve_vectors += c_p.shape[0]
        self.preserve = []


def _check_hidden(batch: list[str], hidden: torch.Tensor) -> None:
    """Refuse non-finite text-encoder outputs, naming the first prompt that has them.

    Raises:
        SolveError: the text encoder's weights hold NaN/inf, or it overflows its dtype.
    """
    if bool(torch.isfinite(hidden.sum(dtype=torch.float32))):  # NaN/inf propagate through a sum
        return
    finite = torch.isfinite(hidden).flatten(1).all(1)  # (B,)
    if bool(finite.all()):
        return
    prompt = batch[int((~finite).nonzero()[0])]
    shown = prompt if len(prompt) <= 60 else prompt[:60] + "…"
    raise SolveError(
        f"the text encoder returned non-finite hidden states (NaN/inf) for the prompt {shown!r} — "
        "its weights hold NaN/inf (check the model's text_encoder files) or it overflows in "
        f"{str(hidden.dtype).removeprefix('torch.')} (try --dtype fp32)"
    )


def _debias_block(
    pair: EditPair,
    spans: list[Span],
    kept: dict[str, torch.Tensor],
    tokens: dict[str, Tokens],
    alignment: str,
) -> DebiasBlock:
    """The block of a debias pair: spans[0] is the prompt itself, spans[1:] its attribute prompts."""
    rows = [kept[t.prompt][t.start : t.start + t.length].to("cpu", torch.float64) for t in spans]
    hidden = preserve_rows(kept[pair.source], tokens[pair.source], alignment)
    hidden = hidden.to("cpu", torch.float64)
    return DebiasBlock(
        source=pair.source,
        C=rows[0],
        A=torch.stack(rows[1:]),
        alphas=tuple(w for _, w in pair.targets[1:]),
        relative=pair.relative,
        preserve_rows=hidden,
    )


def prompt_sections(plan: EditPlan) -> dict[str, str]:
    """prompt → the recipe section it came from (for error messages)."""
    where: dict[str, str] = {}
    for pair in plan.pairs:
        where.setdefault(pair.source, pair.section)
        for prompt, _ in pair.targets:
            where.setdefault(prompt, pair.section)
    for prompt in plan.preserve:
        where.setdefault(prompt, "preserve")
    return where


def pair_spans(plan: EditPlan, tokens: dict[str, Tokens]) -> list[tuple[Span, list[Span]]]:
    """Token spans of every edit pair under the plan's alignment mode, on one group's tokens."""
    return [
        aligned_spans(pair.source, [t for t, _ in pair.targets], tokens, plan.alignment)
        for pair in plan.pairs
    ]


def prompt_tokens(
    plan: EditPlan, text_path: TextPath
) -> tuple[dict[str, dict[str, Tokens]], dict[str, int]]:
    """Every prompt's tokens per group, and its token count (longest over the groups), refusing
    a prompt longer than the text path reads (naming its recipe section).

    Raises:
        UceError: a prompt with more tokens than ``text_path.max_tokens``.
    """
    tokens = text_path.tokens(plan.prompts())
    counts: dict[str, int] = {}
    for per_prompt in tokens.values():
        for prompt, t in per_prompt.items():
            counts[prompt] = max(counts.get(prompt, 0), t.n_tokens)
    check_lengths(counts, text_path.max_tokens, prompt_sections(plan))
    return tokens, counts


def cache_key_of(cache_key: str | None, group: str, n_groups: int) -> str | None:
    """The preserve cache key of one group (a one-group family keeps the key as it was)."""
    if cache_key is None or n_groups == 1:
        return cache_key
    return f"{cache_key}-{group}"


@torch.no_grad()
def collect_statistics(
    plan: EditPlan,
    text_path: TextPath,
    device: torch.device,
    batch_size: int = 32,
    progress: Progress | None = None,
    cache_key: str | None = None,
) -> tuple[dict[str, EditStats], dict[str, int], str]:
    """Encode every unique prompt once and accumulate each group's Gram statistics.

    Args:
        plan: the resolved plan.
        text_path: the family's text path, encoders loaded.
        device: where the float64 Gram matrices live (CPU, or CUDA).
        batch_size: prompts per encoder pass.
        progress: receives one advance per prompt.
        cache_key: key of the preserve set in the on-disk cache (``cache.preserve_key``);
            None disables the cache.

    Returns:
        The statistics per group, the token count of every prompt, and the cache status
        (``hit``, ``miss``, ``corrupt`` — rebuilt — or ``off``; the worst over the groups).
    """
    progress = progress or NullProgress()
    prompts = plan.prompts()
    tokens, counts = prompt_tokens(plan, text_path)
    groups = text_path.groups
    spans = {g.name: pair_spans(plan, tokens[g.name]) for g in groups}

    edit_prompts = {s.prompt for src, tgts in spans[groups[0].name] for s in [src, *tgts]}
    stats = {g.name: EditStats.zeros(g.width, device) for g in groups}
    acc = {g.name: _GramAccumulator(stats[g.name]) for g in groups}
    kept: dict[str, dict[str, torch.Tensor]] = {g.name: {} for g in groups}  # (L, d) per prompt

    statuses = []
    preserve = set(plan.preserve)
    for g in groups:
        key = cache_key_of(cache_key, g.name, len(groups))
        cached, status = load_preserve(key) if key else (None, "off")
        if cached is not None and cached.G_p.shape[0] == g.width:
            stats[g.name].G_p = cached.G_p.to(device)
            stats[g.name].n_preserve_vectors = cached.n_vectors
        elif cached is not None:
            status = "corrupt"
        statuses.append(status)
    status = next((s for s in ("corrupt", "miss", "off", "hit") if s in statuses), statuses[0])
    hits = {g.name for g, s in zip(groups, statuses, strict=True) if s == "hit"}
    if len(hits) == len(groups):
        preserve = set()

    # Two streams, each batched on its own: the prompts edit pairs read, then the prompts only
    # preserved. The edit prompts' batches are then the same whether the preserve set comes from
    # the cache or not (a batch's other rows change a prompt's fp32 encoding in the last bits), so
    # a hit, a miss and --no-cache encode every prompt in the same batch and sum G_p in the same
    # order: bit-identical statistics. (Joining the streams without the cache saved one forward
    # pass but moved the edit by ~1e-8 and changed the fingerprint.)
    # last-token reads positions ≤ f(x) only; a causal encoder makes them independent of what
    # follows, so batches are padded to their longest prompt instead of 77 tokens (exact).
    padding = "max_length" if plan.alignment == "paper" else "longest"
    edit_stream = [p for p in prompts if p in edit_prompts]
    rest = [p for p in prompts if p in preserve and p not in edit_prompts]
    streams = [edit_stream, rest]
    progress.start("encode", sum(map(len, streams)), "prompts")
    for stream in streams:
        for batch, hidden in encode_prompts(text_path, stream, batch_size, progress, padding):
            for g in groups:
                _check_hidden(batch, hidden[g.name])
                for prompt, h in zip(batch, hidden[g.name], strict=True):
                    if prompt in edit_prompts:
                        kept[g.name][prompt] = h
                    if prompt in preserve and g.name not in hits:  # seen positions / last word
                        acc[g.name].add_preserve(
                            preserve_rows(h, tokens[g.name][prompt], plan.alignment)
                        )
    progress.finish()

    for g in groups:
        _accumulate_pairs(plan, spans[g.name], kept[g.name], tokens[g.name], acc[g.name])
        key = cache_key_of(cache_key, g.name, len(groups))
        if key and statuses[groups.index(g)] != "hit":
            save_preserve(
                key,
                PreserveEntry(stats[g.name].G_p, stats[g.name].n_preserve_vectors),
                {"alignment": plan.alignment, "n_prompts": str(len(plan.preserve))},
            )
    return stats, counts, status


def _accumulate_pairs(
    plan: EditPlan,
    spans: list[tuple[Span, list[Span]]],
    kept: dict[str, torch.Tensor],
    tokens: dict[str, Tokens],
    acc: _GramAccumulator,
) -> None:
    """Fold one group's edit pairs into its statistics (debias pairs become blocks)."""
    stats = acc.stats
    for pair, (src, tgts) in zip(plan.pairs, spans, strict=True):
        c_s = kept[src.prompt][src.start : src.start + src.length]
        if pair.relative or pair.auto:
            acc.add_pair(c_s, torch.zeros_like(c_s))  # c cᵀ into G_s; targets built per layer
            stats.debias.append(_debias_block(pair, tgts, kept, tokens, plan.alignment))
        else:
            c_t = sum(
                weight * kept[t.prompt][t.start : t.start + t.length].double()
                for (_, weight), t in zip(pair.targets, tgts, strict=True)
            )
            acc.add_pair(c_s, c_t)
        stats.spans.append(
            {
                "source": src.prompt,
                "source_start": src.start,
                "vectors": src.length,
                "targets": [
                    [t.prompt, w, t.start] for (_, w), t in zip(pair.targets, tgts, strict=True)
                ],
            }
        )
    acc.flush_pairs()
    acc.flush_preserve()
