"""The closed-form embedding attack on an edited layer group: the input vector e* that brings an
erased concept's old keys/values back, and the share of the erasure gap it undoes.

For one group (every edited layer that reads the same embedding, k and v together) and a concept
vector c (a row of the text encoder's output), the attacker solves (RECE's derivation, ECCV 2024)::

    e* = argmin_e Σ_l ‖W_new,l e − W_old,l c‖² + γ‖e‖²
       = (A + γI)⁻¹ B c,   A = Σ_l W_new,lᵀ W_new,l,   B = Σ_l W_new,lᵀ W_old,l      (d × d)

e* is linear in c, so every vector of every concept costs one product once A and B are built.
Without the ridge term an operator edit W_new = W_old·K (K = I + low rank, invertible) is undone
exactly by e = K⁻¹c, whatever its norm; γ keeps ‖e*‖ within the norms of real token vectors of the
encoder. ``gamma=None`` ("auto") picks, per vector, the smallest γ whose e* has a norm no larger
than ``bound`` (bisection in log γ over one eigendecomposition of A): the solution of
min Σ‖W_new e − W_old c‖² subject to ‖e‖ ≤ bound. The bound always admits e = c, so the attack does
at least as well as the concept's own vector and the recovery below is ≥ 0.

Recovery of a set of vectors C (rows), with G = Σ_l W_old,lᵀ W_old,l::

    gap(e, c) = Σ_l ‖W_new,l e − W_old,l c‖² = eᵀAe − 2 eᵀBc + cᵀGc
    attack_recovery = 1 − sqrt(Σ gap(e*, c) / Σ gap(c, c))

1 on the base model (nothing was erased, so nothing is left to recover: by definition); ≈ 0 when
no vector of bounded norm brings the concept back. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uce_cli.errors import SolveError

GAMMA_FLOOR = 1e-9  # γ never goes below this share of A's mean eigenvalue (keeps A + γI regular)
BISECTION_STEPS = 50  # log γ spans ~35 e-folds: 50 halvings resolve γ to ~1e-14
NO_GAP = 1e-12  # an erasure gap below this share of ‖W_old C‖² counts as no edit (base model)


@dataclass(frozen=True)
class Normal:
    """The normal-equation matrices of one group, float64 (d, d): A = Σ W_newᵀW_new,
    B = Σ W_newᵀW_old, G = Σ W_oldᵀW_old."""

    A: torch.Tensor
    B: torch.Tensor
    G: torch.Tensor

    @property
    def width(self) -> int:
        """d_in of the group."""
        return self.A.shape[0]


def normal_matrices(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> Normal:
    """A, B and G summed over the given layers (same names in ``old`` and ``new``), float64.

    Args:
        old: name → W_old (d_out, d_in) of every layer of one group.
        new: name → W_new, the same names.
    """
    a = b = g = None
    for name, w_old in old.items():
        w0 = w_old.to(torch.float64)
        w1 = new[name].to(w0.device, torch.float64)
        a = w1.T @ w1 if a is None else a + w1.T @ w1
        b = w1.T @ w0 if b is None else b + w1.T @ w0
        g = w0.T @ w0 if g is None else g + w0.T @ w0
    if a is None or b is None or g is None:
        raise ValueError("normal_matrices needs at least one layer")
    return Normal(a, b, g)


def gram_of(old: dict[str, torch.Tensor]) -> torch.Tensor:
    """G = Σ_l W_old,lᵀ W_old,l (float64, (d, d))."""
    g = None
    for w_old in old.values():
        w0 = w_old.to(torch.float64)
        g = w0.T @ w0 if g is None else g + w0.T @ w0
    if g is None:
        raise ValueError("gram_of needs at least one layer")
    return g


def operator_normal(g: torch.Tensor, k: torch.Tensor) -> Normal:
    """The matrices of an operator edit W_new = W_old·K from G alone: A = KᵀGK, B = KᵀG (two
    d×d products instead of three per layer; exact in float64, where the stored weights are
    W_old·K rounded once to their dtype)."""
    k = k.to(g.device, torch.float64)
    b = k.T @ g
    return Normal(b @ k, b, g)


def _ridge_solve(normal: Normal, rhs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Rows of (A + γI)⁻¹ rhsᵀ, by Cholesky (A + γI is symmetric positive definite for γ > 0)."""
    eye = torch.eye(normal.width, dtype=torch.float64, device=normal.A.device)
    chol, info = torch.linalg.cholesky_ex(normal.A + gamma * eye)
    if int(info) != 0:
        raise SolveError(
            f"the attack's system A + γI is singular at gamma={gamma:g} — use gamma > 0 or auto"
        )
    return torch.cholesky_solve(rhs.T.contiguous(), chol).T


def attack_embeddings(
    normal: Normal, c: torch.Tensor, gamma: float | None = None, bound: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """e* for every row of ``c``, and the γ used for each.

    Args:
        normal: the group's matrices (``normal_matrices``).
        c: (n, d) concept vectors.
        gamma: a fixed ridge γ ≥ 0 (0 is allowed where A is regular); None = auto.
        bound: (n,) or scalar norm bound for auto (default: each row's own norm); the bound used
            is never below the row's own norm, so e = c stays admissible.

    Returns:
        ((n, d) float64 e*, (n,) float64 γ per row).
    """
    c = c.to(normal.A.device, torch.float64)
    rhs = c @ normal.B.T  # (n, d): B c per row
    n = c.shape[0]
    if gamma is not None:
        if gamma < 0:
            raise SolveError(f"gamma must be >= 0 (or auto), got {gamma:g}")
        e = _ridge_solve(normal, rhs, gamma)
        return e, torch.full((n,), float(gamma), dtype=torch.float64)
    own = c.norm(dim=1)
    limit = own if bound is None else torch.maximum(own, torch.as_tensor(bound).to(own))
    lam, q = torch.linalg.eigh(normal.A)  # A = Q diag(λ) Qᵀ, λ ≥ 0 up to rounding
    lam = lam.clamp_min(0)
    u = rhs @ q  # (n, d): coordinates of B c in A's eigenbasis
    floor = GAMMA_FLOOR * max(float(lam.mean()), 1e-300)

    def norms(g: torch.Tensor) -> torch.Tensor:  # ‖e*(γ)‖ per row, γ per row
        return (u / (lam + g[:, None])).norm(dim=1)

    lo = torch.full((n,), floor, dtype=torch.float64, device=u.device)
    hi = torch.full_like(lo, max(float(lam.max()), floor))
    while bool((norms(hi) > limit).any()):  # ‖e*‖ → 0 as γ → ∞: grow until every row fits
        hi = torch.where(norms(hi) > limit, hi * 1e3, hi)
    fits_at_floor = norms(lo) <= limit
    for _ in range(BISECTION_STEPS):  # ‖e*(γ)‖ decreases in γ: the smallest γ that fits
        mid = (lo.log() + hi.log()).mul(0.5).exp()
        over = norms(mid) > limit
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    g = torch.where(fits_at_floor, torch.full_like(lo, floor), hi)
    e = (u / (lam + g[:, None])) @ q.T
    return e, g.cpu()


def gaps(normal: Normal, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_l ‖W_new,l e_i − W_old,l c_i‖² per row i (float64, (n,))."""
    e = e.to(normal.A.device, torch.float64)
    c = c.to(normal.A.device, torch.float64)
    value = (
        ((e @ normal.A) * e).sum(1) - 2 * ((e @ normal.B) * c).sum(1) + ((c @ normal.G) * c).sum(1)
    )
    return value.clamp_min(0)


def recovery(normal: Normal, e: torch.Tensor, c: torch.Tensor) -> float:
    """attack_recovery of the rows ``c`` attacked with the rows ``e``: 1 − sqrt(Σ gap(e,c)/Σ gap(c,c)).

    1.0 where the edit left no gap on these vectors (the base model, by definition).
    """
    c64 = c.to(normal.A.device, torch.float64)
    edit_gap = float(gaps(normal, c64, c64).sum())
    scale = float(((c64 @ normal.G) * c64).sum())
    if edit_gap <= NO_GAP * max(scale, 1e-300):
        return 1.0
    return 1.0 - (float(gaps(normal, e, c64).sum()) / edit_gap) ** 0.5


def token_norm_bound(rows: torch.Tensor) -> float:
    """The largest norm among real token vectors (rows of the encoder's output), float."""
    return float(rows.to(torch.float64).norm(dim=1).max())
