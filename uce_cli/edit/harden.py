"""``harden:`` — RECE-style rounds that close the closed-form embedding attack on an edit.

Each round, per group of editable layers: the attack embeddings e* of every erased/moderated
vector are computed against the current weights (``edit.adversary``; γ ridge = RECE's regularizer,
which keeps e* among vectors a real prompt could produce instead of chasing K⁻¹c), the pairs
(e* → the concept's guide vectors) join the erase statistics, and the edit is solved again from
the *base* weights with the same scales (``solve_edit``, so it composes with any solver method).
Pairs accumulate over rounds. The round record keeps the attack's recovery before and after, the
efficacy on the recipe's own pairs and the preserve drift. The rounds stop early once the attack
recovers less than ``tolerance``; a round that does not lower the recovery is undone (its weights
are not kept) and ends the rounds; ``kept_round`` names the round whose weights are written (0:
the plain edit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from uce_cli.edit.adversary import (
    Normal,
    attack_embeddings,
    gaps,
    gram_of,
    normal_matrices,
    operator_normal,
    recovery,
)
from uce_cli.edit.encode import aligned_spans, encode_prompts
from uce_cli.edit.plan import EditPlan
from uce_cli.edit.recipe import Harden
from uce_cli.edit.solve import Scales, solve_edit
from uce_cli.edit.stats import EditStats, with_pairs
from uce_cli.families.base import TextPath


@dataclass
class AttackRows:
    """One group's erased vectors: sources C_s, their targets' vectors C_t, and the norm bound."""

    sources: torch.Tensor  # (n, d) float64: aligned rows of every erase/moderate source prompt
    targets: torch.Tensor  # (n, d) float64: the guide's aligned rows (weighted sum of targets)
    bound: float  # largest norm of a real token vector among these prompts (BOS left out)


def erased_pairs(plan: EditPlan) -> list[Any]:
    """The plan's erase and moderate pairs (debias pairs are not hardened)."""
    return [p for p in plan.pairs if not p.section.startswith("debias")]


@torch.no_grad()
def attack_rows(plan: EditPlan, text_path: TextPath, batch_size: int = 32) -> dict[str, AttackRows]:
    """Encode the erased pairs' prompts once and gather each group's aligned rows.

    Rows are paired as the plan's alignment pairs them (paper: last word onwards; last-token: the
    last word token), exactly the vectors the edit itself moved.
    """
    pairs = erased_pairs(plan)
    prompts = list(dict.fromkeys(p for pair in pairs for p in [pair.source, *dict(pair.targets)]))
    tokens = text_path.tokens(prompts)
    padding = "max_length" if plan.alignment == "paper" else "longest"
    kept: dict[str, dict[str, torch.Tensor]] = {g.name: {} for g in text_path.groups}
    for batch, hidden in encode_prompts(text_path, prompts, batch_size, None, padding):
        for g in text_path.groups:
            for prompt, h in zip(batch, hidden[g.name], strict=True):
                kept[g.name][prompt] = h.to("cpu", torch.float64)
    rows: dict[str, AttackRows] = {}
    for g in text_path.groups:
        sources, targets, norms = [], [], []
        for pair in pairs:
            src, tgts = aligned_spans(
                pair.source, [t for t, _ in pair.targets], tokens[g.name], plan.alignment
            )
            sources.append(kept[g.name][src.prompt][src.start : src.start + src.length])
            targets.append(
                sum(
                    w * kept[g.name][t.prompt][t.start : t.start + t.length]
                    for (_, w), t in zip(pair.targets, tgts, strict=True)
                )
            )
        for prompt in prompts:
            t = tokens[g.name][prompt]
            first = 1 if t.seen > 1 else 0  # BOS carries an outsized norm no word token has
            norms.append(kept[g.name][prompt][first : max(t.seen, 1)].norm(dim=1).max())
        rows[g.name] = AttackRows(torch.cat(sources), torch.cat(targets), float(max(norms)))
    return rows


def _efficacy(normal: Normal, rows: AttackRows) -> float:
    """1 − ‖W_new C_s − W_old C_t‖ / ‖W_old C_s − W_old C_t‖ over the group's layers."""
    s, t = rows.sources, rows.targets
    after = float(gaps(normal, s, t).sum())
    d = (s - t).to(normal.G)
    before = float(((d @ normal.G) * d).sum())
    return 1.0 - (after / before) ** 0.5 if before > 0 else 0.0


def _mean_drift(metrics: dict[str, dict[str, float]]) -> float:
    """Mean preserve drift over the layers."""
    values = [m["preserve_drift"] for m in metrics.values()]
    return sum(values) / len(values) if values else 0.0


def harden_edit(
    weights: dict[str, torch.Tensor],
    stats: EditStats,
    scales: Scales,
    rows: AttackRows,
    spec: Harden,
    origin: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, dict[str, float]], dict]:
    """The plain solve, then up to ``spec.rounds`` attack → re-solve rounds on one group.

    Args:
        weights: name → W_old of the group's layers (the base weights).
        stats: the group's statistics of the plain edit.
        scales: λ, s_e, s_p (and whatever else ``solve_edit`` reads), the same every round.
        rows: the group's erased vectors (``attack_rows``).
        spec: the recipe's ``harden:``.
        origin: name → file of each W_old (for solve_edit's messages).

    Returns:
        The last round's new weights, operator (or None) and per-layer metrics, and the record.
    """
    gamma = None if spec.gamma == "auto" else float(spec.gamma)
    new, k, metrics = solve_edit(weights, stats, scales, origin)
    added_s: list[torch.Tensor] = []
    added_t: list[torch.Tensor] = []
    record: dict[str, Any] = {
        "gamma": spec.gamma,
        "target": spec.target,
        "tolerance": spec.tolerance,
        "vectors_per_round": int(rows.sources.shape[0]),
        "norm_bound": rows.bound,
        "rounds": [],
    }
    g = gram_of(weights)  # the base's G, once: an operator edit's A and B follow from K

    def normal_of(new: dict[str, torch.Tensor], k: torch.Tensor | None) -> Normal:
        return operator_normal(g, k) if k is not None else normal_matrices(weights, new)

    normal = normal_of(new, k)
    for r in range(1, spec.rounds + 1):
        t0 = time.perf_counter()
        e, used = attack_embeddings(normal, rows.sources, gamma, rows.bound)
        before = recovery(normal, e, rows.sources)
        entry: dict[str, Any] = {
            "round": r,
            "recovery_before": before,
            "gamma_median": float(used.median()),
            "norm_ratio": float(
                (e.norm(dim=1) / rows.sources.norm(dim=1).clamp_min(1e-300)).mean()
            ),
        }
        if before < spec.tolerance:
            entry["stopped"] = f"recovery {before:.4g} < tolerance {spec.tolerance:g}"
            record["rounds"].append(entry)
            break
        added_s.append(e)
        added_t.append(rows.targets)
        hardened = with_pairs(stats, torch.cat(added_s), torch.cat(added_t))
        trial = solve_edit(weights, hardened, scales, origin)
        trial_normal = normal_of(trial[0], trial[1])
        e_after, _ = attack_embeddings(trial_normal, rows.sources, gamma, rows.bound)
        after = recovery(trial_normal, e_after, rows.sources)
        entry.update(
            recovery_after=after,
            efficacy=_efficacy(trial_normal, rows),
            preserve_drift=_mean_drift(trial[2]),
            added_vectors=int(sum(x.shape[0] for x in added_s)),
            seconds=round(time.perf_counter() - t0, 4),
        )
        record["rounds"].append(entry)
        if after >= before:
            # Too few free directions (the erased and preserved vectors already span the input
            # space): the round cannot lower the recovery without undoing the edit. Keep the
            # previous weights and stop.
            entry["undone"] = f"recovery did not fall ({before:.4g} → {after:.4g}): round undone"
            break
        (new, k, metrics), normal = trial, trial_normal
    record["kept_round"] = max(
        (r["round"] for r in record["rounds"] if "recovery_after" in r and "undone" not in r),
        default=0,
    )
    return new, k, metrics, record
