"""Preserve sets chosen by measurement: keep-exact vectors and influence-based prior filtering.

``solver.keep_exact`` adds vectors the update must not move at all (``EditStats.keep_exact``):
``sot`` — position 0 of the empty prompt's hidden states (CLIP's start-of-text token, the same
for every prompt of a causal encoder; the first position for encoders without one) — and
``empty`` — the rows the empty prompt ``""`` contributes as a preserve prompt (all seen positions
in paper mode, its position 0 in last-token mode).

``preserve: [{concepts_file: …, auto: {top: N}}]`` is SPEED's influence-based prior filtering in
uce's terms: the edit is first solved without the group (its method, the explicit preserve set),
then every candidate concept is encoded once and its text-side drift measured on the statistics
of that plain edit::

    drift(c)² = Σ_x xᵀ H_Δ x / Σ_x xᵀ H_W x,   H_Δ = Σ_l ΔW_lᵀ ΔW_l,   H_W = Σ_l W_lᵀ W_l

(x over the candidate's preserve rows, l over the edited layers, summed over groups): the
relative movement of the candidate's outputs, pooled over layers. The ``top`` N most moved
concepts join the preserve set (their Gram into G_p); ties keep the candidate order.

``auto: {top: N, augment: {copies: K, scale: s, directions: r, seed: S}}`` also preserves K
seeded perturbations of every chosen vector x (a one-operator variant of SPEED's DPA); x and its
K copies then share one vector's weight in G_p (each scaled by 1/√(K+1))::

    x' = x + s ‖x‖ V_r ξ / √r,   ξ ~ N(0, I_r),   V_r = the r weakest eigenvectors of H_W

H_W = Σ_l W_lᵀ W_l is the Gram of the group's stacked W_old, so V_r are the weakest
right-singular directions of all its layers pooled: one set of directions, one G_p, one operator
per group (SPEED draws them per layer; docs/design.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from uce_cli.edit.encode import encode_prompts, preserve_rows
from uce_cli.edit.plan import AutoCandidates
from uce_cli.edit.recipe import AugmentPreserve
from uce_cli.errors import RecipeError
from uce_cli.families.base import TextPath
from uce_cli.progress import NullProgress, Progress

if TYPE_CHECKING:  # statistics sit a layer above; new ones are made with dataclasses.replace
    from uce_cli.edit.stats import EditStats


def _padding(alignment: str) -> str:
    """Paper mode reads every position (pad to 77); last-token reads up to the last word only."""
    return "max_length" if alignment == "paper" else "longest"


@torch.no_grad()
def keep_exact_rows(
    text_path: TextPath, alignment: str, which: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The keep-exact vectors of every group, ``(n, d)`` float64 on the CPU.

    Args:
        text_path: the family's text path, encoders loaded.
        alignment: ``paper`` | ``last-token`` (which rows ``empty`` contributes).
        which: a subset of ``("sot", "empty")``.
    """
    tokens = text_path.tokens([""])
    [(_, hidden)] = list(encode_prompts(text_path, [""], 1, None, _padding(alignment)))
    rows: dict[str, torch.Tensor] = {}
    for group in text_path.groups:
        h = hidden[group.name][0]  # (L, d)
        parts = []
        if "sot" in which:
            parts.append(h[:1])
        if "empty" in which:
            parts.append(preserve_rows(h, tokens[group.name][""], alignment))
        rows[group.name] = torch.cat(parts).to("cpu", torch.float64)
    return rows


def with_keep_exact(stats: EditStats, rows: torch.Tensor) -> EditStats:
    """Statistics with keep-exact vectors (a new object; ``stats`` is unchanged)."""
    return replace(stats, keep_exact=rows.to(stats.G_p.device, torch.float64))


def drift_forms(
    old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_Δ, H_W) = (Σ ΔWᵀΔW, Σ W_oldᵀW_old) over the layers, float64 (d × d): one GEMM each."""
    h_delta = h_w = None
    for name, w_old in old.items():
        w0 = w_old.to(torch.float64)
        dw = new[name].to(torch.float64) - w0
        h_delta = dw.T @ dw if h_delta is None else h_delta + dw.T @ dw
        h_w = w0.T @ w0 if h_w is None else h_w + w0.T @ w0
    assert h_delta is not None and h_w is not None
    return h_delta, h_w


@dataclass
class AutoChoice:
    """What one auto group chose: concepts by decreasing drift, and each candidate's drift."""

    section: str
    top: int
    chosen: list[str]
    drift: dict[str, float]  # candidate → relative drift under the plain edit
    prompts: list[str] = field(default_factory=list)  # the chosen concepts' prompts
    rows: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # group → (n, d)
    augment: dict[str, Any] | None = None  # the settings and vectors added per group, if any
    counts: dict[str, int] = field(default_factory=dict)  # group → vectors (copies not counted)

    def record(self) -> dict[str, Any]:
        """The edit log's entry."""
        entry = {
            "section": self.section,
            "top": self.top,
            "candidates": len(self.drift),
            "chosen": self.chosen,
            "drift": {c: round(v, 8) for c, v in self.drift.items()},
        }
        if self.augment is not None:
            entry["augment"] = self.augment
        return entry


def weakest_directions(h_w: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` eigenvectors of H_W with the smallest eigenvalues, ``(d, count)`` float64."""
    _, vectors = torch.linalg.eigh(h_w.to("cpu", torch.float64))
    return vectors[:, :count]


def augment_rows(
    rows: torch.Tensor, h_w: torch.Tensor, augment: AugmentPreserve, where: str
) -> torch.Tensor:
    """``augment.copies`` seeded perturbations of every row (float64, copies × n rows, copy-major).

    Args:
        rows: the chosen preserve vectors ``(n, d)``.
        h_w: Σ W_lᵀ W_l of the group's layers (d × d).
        augment: the recipe's settings.
        where: the preserve group's section, for errors.
    """
    n, d = rows.shape
    if augment.directions > d:
        raise RecipeError(
            [
                f"{where}.auto.augment.directions: {augment.directions} is more than the text "
                f"width {d} — use at most {d}"
            ]
        )
    v = weakest_directions(h_w, augment.directions)
    gen = torch.Generator().manual_seed(augment.seed)
    xi = torch.randn(augment.copies, n, augment.directions, generator=gen, dtype=torch.float64)
    x = rows.to("cpu", torch.float64)
    step = (xi @ v.T) * (augment.scale / augment.directions**0.5)
    perturbed = x + x.norm(dim=1, keepdim=True) * step  # (copies, n, d)
    return perturbed.reshape(-1, d)


@torch.no_grad()
def choose_preserve(
    candidates: AutoCandidates,
    text_path: TextPath,
    alignment: str,
    forms: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 32,
    progress: Progress | None = None,
) -> AutoChoice:
    """Encode every candidate once, measure its drift, keep the ``top`` most moved concepts.

    Args:
        candidates: the auto group (concept → prompts).
        text_path: the family's text path, encoders loaded.
        alignment: which rows a preserve prompt contributes.
        forms: group → ``drift_forms`` of the plain edit (groups not edited are left out).
        batch_size: prompts per encoder pass.
        progress: one advance per prompt.
    """
    progress = progress or NullProgress()
    concepts = list(candidates.concepts)
    owner = [(ci, p) for ci, c in enumerate(concepts) for p in candidates.concepts[c]]
    tokens = text_path.tokens([p for _, p in owner])
    remaining = [len(candidates.concepts[c]) for c in concepts]
    num = [0.0] * len(concepts)
    den = [0.0] * len(concepts)
    pending: dict[int, dict[str, list[torch.Tensor]]] = {}  # rows of concepts still in the race
    kept: list[tuple[float, int]] = []  # (drift, index) of the current top
    drift: dict[str, float] = {}
    progress.start(f"measure {candidates.section}", len(owner), "prompts")
    position = 0
    for batch, hidden in encode_prompts(
        text_path, [p for _, p in owner], batch_size, progress, _padding(alignment)
    ):
        for i, prompt in enumerate(batch):
            ci = owner[position + i][0]
            for group, (h_delta, h_w) in forms.items():
                x = preserve_rows(hidden[group][i], tokens[group][prompt], alignment)
                x = x.to(h_delta.device, torch.float64)
                num[ci] += float(((x @ h_delta) * x).sum())
                den[ci] += float(((x @ h_w) * x).sum())
                pending.setdefault(ci, {}).setdefault(group, []).append(x.to("cpu", torch.float32))
            remaining[ci] -= 1
            if remaining[ci] == 0:
                value = (num[ci] / den[ci]) ** 0.5 if den[ci] > 0 else 0.0
                drift[concepts[ci]] = value
                kept.append((value, ci))
                kept.sort(key=lambda t: (-t[0], t[1]))
                for _, dropped in kept[candidates.top :]:
                    pending.pop(dropped, None)
                kept = kept[: candidates.top]
        position += len(batch)
    progress.finish()
    chosen = [concepts[ci] for _, ci in kept]
    rows = {
        group: torch.cat([torch.cat(pending[ci][group]) for _, ci in kept]).to(torch.float64)
        for group in forms
    }
    prompts = [p for c in chosen for p in candidates.concepts[c]]
    augment = candidates.augment
    if augment is None:
        return AutoChoice(candidates.section, candidates.top, chosen, drift, prompts, rows)
    extra = {g: augment_rows(rows[g], forms[g][1], augment, candidates.section) for g in forms}
    record = augment.model_dump() | {"vectors": {g: int(x.shape[0]) for g, x in extra.items()}}
    # a vector and its copies share one vector's weight (SPEED averages its Gram over all rows),
    # and count as one for the null-space threshold: s = 0 gives back the plain choice
    weight = 1.0 / (augment.copies + 1) ** 0.5
    counts = {g: int(rows[g].shape[0]) for g in forms}
    rows = {g: torch.cat([rows[g], extra[g]]) * weight for g in forms}
    return AutoChoice(
        candidates.section, candidates.top, chosen, drift, prompts, rows, record, counts
    )


def with_preserved(stats: EditStats, rows: torch.Tensor, count: int | None = None) -> EditStats:
    """Statistics with extra preserve vectors folded into G_p (a new object); ``count`` (default:
    the rows) is how many vectors they add to ``n_preserve_vectors``."""
    x = rows.to(stats.G_p.device, torch.float64)
    added = x.shape[0] if count is None else count
    return replace(
        stats, G_p=stats.G_p + x.T @ x, n_preserve_vectors=stats.n_preserve_vectors + added
    )
