"""Text-side evaluation: efficacy, leakage and drift of an edit from the text encoder and the base
and edited k/v weights alone (no UNet, no images). docs/metrics.md defines every figure.

For a held-out prompt ``p`` of an edited concept with guide ``g``, positions pair as the paper
alignment pairs them (docs/design.md): ``p``'s last word token onwards with ``g``'s. Per layer,

    gap_before = ‖W_old·C_p − W_old·C_g‖_F,   gap_after = ‖W_new·C_p − W_old·C_g‖_F
    efficacy = 1 − gap_after / gap_before                      (sums over a concept's vectors)

split by position class (word = the last word token, eos, pad) for ``efficacy_word``,
``leakage_eos = gap_after/gap_before`` at EOS and ``leakage_pad`` likewise. Drift of a set of
prompts is ``‖(W_new − W_old)·C‖_F / ‖W_old·C‖_F`` over all seen positions of every prompt (77
for CLIP). Vectors come from the model family's text path, per group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from uce_cli.edit.encode import aligned_spans, encode_prompts
from uce_cli.families.base import TextPath, Tokens
from uce_cli.progress import NullProgress, Progress

CHUNK = 8192  # vectors per matmul
CLASSES = ("word", "eos", "pad")


@dataclass
class HeldOutPrompt:
    """A held-out phrasing of an edited concept and the guide the edit moved the concept to."""

    prompt: str
    concept: str
    guide: str


@dataclass
class DriftPrompt:
    """A prompt whose outputs should not move, and the concept (or set) it belongs to."""

    prompt: str
    concept: str


@dataclass
class TextInputs:
    """Everything the text-side report reads besides weights."""

    heldout: list[HeldOutPrompt] = field(default_factory=list)
    preserved: list[DriftPrompt] = field(default_factory=list)
    unrelated: list[DriftPrompt] = field(default_factory=list)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """sqrt(num/den), NaN where den is 0 (no such positions)."""
    return torch.where(den > 0, (num / den.clamp_min(1e-300)).sqrt(), torch.nan)


@dataclass
class GroupRows:
    """One group's encoded prompts and the rows each figure reads from them."""

    flat: torch.Tensor  # (N·L, d) float32: every prompt's vectors, row = index·L + position
    held: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # source rows, target rows, class·concept
    drift_sets: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]


def _capped(t: Tokens, length: int) -> Tokens:
    """A prompt's tokens as the pipeline truncates it to ``length`` (last word before the EOS).

    A prompt that fits keeps its family's own positions (Gemma, for one, has no EOS after the
    last word).
    """
    if t.n_tokens <= length:
        return t
    n = min(t.n_tokens, length)
    return Tokens(n, min(t.last_word, max(n - 2, 0)), min(t.seen, length))


def encode_unique(
    text_path: TextPath, prompts: list[str], batch_size: int, progress: Progress
) -> tuple[dict[str, int], dict[str, torch.Tensor], dict[str, dict[str, Tokens]]]:
    """Encode each unique prompt once (truncated to the encoder's length, as pipelines do).

    Returns:
        prompt → row index, per group the vectors ``(N, L, d)`` float32 on CPU, and per group
        prompt → Tokens (capped at L).
    """
    unique = list(dict.fromkeys(prompts))
    tokens = text_path.tokens(unique)
    progress.start("encode", total=len(unique), unit="prompt")
    parts: dict[str, list[torch.Tensor]] = {g.name: [] for g in text_path.groups}
    for _, hidden in encode_prompts(text_path, unique, batch_size, progress):
        for group, h in hidden.items():
            parts[group].append(h.float().cpu())
    progress.finish()
    hidden = {
        g.name: torch.cat(parts[g.name])
        if parts[g.name]
        else torch.zeros(0, text_path.max_tokens, 0)
        for g in text_path.groups
    }
    capped = {
        group: {p: _capped(t, hidden[group].shape[1] or t.seen) for p, t in per.items()}
        for group, per in tokens.items()
    }
    return {p: i for i, p in enumerate(unique)}, hidden, capped


def _group_rows(
    inputs: TextInputs,
    concepts: list[str],
    index: dict[str, int],
    hidden: torch.Tensor,
    tokens: dict[str, Tokens],
) -> GroupRows:
    """The rows of one group: held-out pairs as the paper alignment pairs them, drift prompts' seen positions."""
    length = hidden.shape[1] if hidden.numel() else 0
    src_rows, tgt_rows, cls, owner = [], [], [], []
    for h in inputs.heldout:
        src, (tgt,) = aligned_spans(h.prompt, [h.guide], tokens, "paper")
        word = tokens[h.prompt].last_word
        eos = word + 1
        for i in range(src.length):
            pos = src.start + i
            src_rows.append(index[h.prompt] * length + pos)
            tgt_rows.append(index[h.guide] * length + tgt.start + i)
            cls.append(0 if pos == word else 1 if pos == eos else 2)
            owner.append(concepts.index(h.concept))
    flat = hidden.reshape(-1, hidden.shape[-1]) if hidden.numel() else hidden
    held = (
        torch.tensor(src_rows, dtype=torch.long),
        torch.tensor(tgt_rows, dtype=torch.long),
        torch.tensor(cls, dtype=torch.long) * len(concepts) + torch.tensor(owner, dtype=torch.long),
    )
    drift_sets = {
        name: _drift_rows(items, index, length, tokens)
        for name, (items) in (("preserve", inputs.preserved), ("unrelated", inputs.unrelated))
    }
    return GroupRows(flat, held, drift_sets)


def text_figures(
    inputs: TextInputs,
    text_path: TextPath,
    w_old: dict[str, torch.Tensor],
    w_new: dict[str, torch.Tensor],
    batch_size: int = 32,
    progress: Progress | None = None,
    group_of: dict[str, str] | None = None,
) -> dict:
    """Compute the text-side report.

    Args:
        inputs: held-out, preserved and unrelated prompts.
        text_path: the base model's (the edit does not touch the text encoders), encoders loaded.
        w_old, w_new: base and edited weights by layer key, ``(d_out, d_in)``.
        batch_size: prompts per encoder pass.
        progress: stage reporting.
        group_of: layer key → the group it reads (default: the text path's first group).

    Returns:
        ``{"figures", "layers", "concepts", "timings", "counts"}`` — see docs/metrics.md.
    """
    progress = progress or NullProgress()
    prompts = [h.prompt for h in inputs.heldout] + [h.guide for h in inputs.heldout]
    prompts += [d.prompt for d in inputs.preserved] + [d.prompt for d in inputs.unrelated]
    t0 = time.perf_counter()
    index, hidden, tokens = encode_unique(text_path, prompts, batch_size, progress)
    timings = {"encode": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()

    concepts = list(dict.fromkeys(h.concept for h in inputs.heldout))
    rows = {
        group: _group_rows(inputs, concepts, index, hidden[group], tokens[group])
        for group in hidden
    }
    first = text_path.groups[0].name
    group_of = group_of or {}
    src_rows = rows[first].held[0]
    drift_sets = rows[first].drift_sets

    progress.start("measure", total=len(w_old), unit="layer")
    layers: dict[str, dict[str, float]] = {}
    per_concept_before = torch.zeros(len(w_old), len(CLASSES) * len(concepts), dtype=torch.float64)
    per_concept_after = torch.zeros_like(per_concept_before)
    drift_acc = {
        name: (
            torch.zeros(len(w_old), len(names), dtype=torch.float64),
            torch.zeros(len(w_old), len(names), dtype=torch.float64),
        )
        for name, (_, _, names) in drift_sets.items()
    }
    for li, key in enumerate(w_old):
        old = w_old[key].float()  # (d_out, d_in)
        delta = w_new[key].float() - old
        layer = rows[group_of.get(key, first)]
        if len(src_rows):
            before, after = _gaps(layer.flat, layer.held, old, delta, len(CLASSES) * len(concepts))
            per_concept_before[li], per_concept_after[li] = before, after
        for name, (drift_rows, group, names) in layer.drift_sets.items():
            if len(names):
                moved, base = _drift(layer.flat, drift_rows, group, old, delta, len(names))
                drift_acc[name][0][li], drift_acc[name][1][li] = moved, base
        progress.advance()
    progress.finish()

    timings["measure"] = round(time.perf_counter() - t0, 3)
    n_c = len(concepts)
    by_class_before = per_concept_before.view(len(w_old), len(CLASSES), n_c)
    by_class_after = per_concept_after.view(len(w_old), len(CLASSES), n_c)
    # (layers, concepts) figures
    efficacy = 1 - _ratio(by_class_after.sum(1), by_class_before.sum(1))
    efficacy_word = 1 - _ratio(by_class_after[:, 0], by_class_before[:, 0])
    leakage_eos = _ratio(by_class_after[:, 1], by_class_before[:, 1])
    leakage_pad = _ratio(by_class_after[:, 2], by_class_before[:, 2])
    edited_figures = {
        "efficacy": efficacy,
        "efficacy_word": efficacy_word,
        "leakage_eos": leakage_eos,
        "leakage_pad": leakage_pad,
    }
    drift = {
        name: _ratio(moved, base) for name, (moved, base) in drift_acc.items()
    }  # (layers, concepts)
    drift_all = {
        name: _ratio(moved.sum(1), base.sum(1)) for name, (moved, base) in drift_acc.items()
    }  # (layers,)

    keys = list(w_old)
    for li, key in enumerate(keys):
        layers[key] = {name: _mean(values[li]) for name, values in edited_figures.items()}
        layers[key]["drift_preserve"] = _num(drift_all["preserve"][li])
        layers[key]["drift_unrelated"] = _num(drift_all["unrelated"][li])
    figures = {name: _mean(values.nanmean(0)) for name, values in edited_figures.items()}
    figures["drift_preserve"] = _mean(drift_all["preserve"])
    figures["drift_unrelated"] = _mean(drift_all["unrelated"])
    concept_table = {
        "edited": {
            c: {
                **{name: _num(values[:, ci].nanmean()) for name, values in edited_figures.items()},
                "prompts": sum(h.concept == c for h in inputs.heldout),
            }
            for ci, c in enumerate(concepts)
        },
        **{
            name: {c: _num(drift[name][:, ci].nanmean()) for ci, c in enumerate(names)}
            for name, (_, _, names) in drift_sets.items()
        },
    }
    return {
        "figures": figures,
        "layers": layers,
        "concepts": concept_table,
        "timings": timings,
        "counts": {
            "heldout_prompts": len(inputs.heldout),
            "heldout_vectors": len(src_rows),
            "preserve_prompts": len({d.prompt for d in inputs.preserved}),
            "unrelated_prompts": len({d.prompt for d in inputs.unrelated}),
            "unique_prompts_encoded": len(index),
        },
    }


def _num(value: torch.Tensor) -> float | None:
    v = float(value)
    return None if v != v else v


def _mean(values: torch.Tensor) -> float | None:
    """Mean over the finite entries; None when there are none."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def _drift_rows(
    items: list[DriftPrompt], index: dict[str, int], length: int, tokens: dict[str, Tokens]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All seen positions of each unique prompt, with the concept group each row belongs to."""
    names = list(dict.fromkeys(d.concept for d in items))
    seen: dict[str, int] = {}
    for d in items:
        seen.setdefault(d.prompt, names.index(d.concept))
    rows = [index[p] * length + i for p in seen for i in range(tokens[p].seen)]
    group = [g for p, g in seen.items() for _ in range(tokens[p].seen)]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(group, dtype=torch.long), names


def _gaps(
    flat: torch.Tensor,
    held: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    old: torch.Tensor,
    delta: torch.Tensor,
    n_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared gaps before/after the edit, summed per (class, concept) group."""
    src, tgt, group = held
    before = torch.zeros(n_groups, dtype=torch.float64)
    after = torch.zeros(n_groups, dtype=torch.float64)
    # Targets are a few guides' rows shared by many held-out prompts: project each row once.
    rows, which = torch.unique(tgt, return_inverse=True)
    targets = flat[rows] @ old.T  # (unique target rows, d_out)
    for s in range(0, len(src), CHUNK):
        x = flat[src[s : s + CHUNK]]  # (n, d_in)
        y_target = targets[which[s : s + CHUNK]]  # (n, d_out)
        y_old = x @ old.T
        gap = y_old - y_target
        before.index_add_(0, group[s : s + CHUNK], gap.pow(2).sum(1).double())
        after.index_add_(0, group[s : s + CHUNK], (gap + x @ delta.T).pow(2).sum(1).double())
    return before, after


def _drift(
    flat: torch.Tensor,
    rows: torch.Tensor,
    group: torch.Tensor,
    old: torch.Tensor,
    delta: torch.Tensor,
    n_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """‖ΔW·c‖² and ‖W_old·c‖² summed per concept group."""
    moved = torch.zeros(n_groups, dtype=torch.float64)
    base = torch.zeros(n_groups, dtype=torch.float64)
    for s in range(0, len(rows), CHUNK):
        x = flat[rows[s : s + CHUNK]]
        g = group[s : s + CHUNK]
        moved.index_add_(0, g, (x @ delta.T).pow(2).sum(1).double())
        base.index_add_(0, g, (x @ old.T).pow(2).sum(1).double())
    return moved, base
