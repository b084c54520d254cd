"""The constrained closed form: UCE's objective solved for an update restricted to free directions.

UCE's least squares lets every preserved vector move a little. Here the update is ``ΔW = D`` with
``D = D·P``, P the orthogonal projector onto the *free* directions (docs/design.md §"Null-space
solver"): the eigen-directions of ``G_p = Σ c_j c_jᵀ`` (n vectors) whose eigenvalues are below
``τ·tr(G_p)/n``, τ times the mean squared norm of a preserve vector (``solver.method:
null-space``), less the span of the keep-exact vectors (``solver.keep_exact``, either method). With Q (d × r) an orthonormal basis of the free space
and ``M = λI + s_e G_s + s_p G_p`` the UCE Gram matrix, the minimiser of UCE's objective over
such D is::

    D = s_e · R · Q (Qᵀ M Q)⁻¹ Qᵀ,     R = Σ_i (v*_i − W_old c_i) c_iᵀ

For targets linear in W_old, ``R = W_old (G_ts − G_s)`` and the edit is again one operator::

    W_new = W_old · K,   K = I + s_e (G_ts − G_s) Q (Qᵀ M Q)⁻¹ Qᵀ

(with Q = I it is UCE's K). Since c_j c_jᵀ ⪯ G_p, ‖P c_j‖² ≤ λ_max(P G_p P) < τ·tr(G_p)/n, so
preserved vectors move by at most ``‖ΔW c_j‖ ≤ ‖ΔW‖₂ · sqrt(τ)·rms‖c‖`` (rms over the preserve
vectors), whatever their number; keep-exact vectors by float rounding only.

Invariant: everything here is float64; Qᵀ M Q (r × r) is factorized by Cholesky, never inverted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from uce_cli.edit.recipe import DEFAULT_NULL_SPACE_THRESHOLD
from uce_cli.errors import SolveError

if TYPE_CHECKING:  # statistics sit a layer above; only their fields are read here
    from uce_cli.edit.stats import EditStats

DEFAULT_THRESHOLD = DEFAULT_NULL_SPACE_THRESHOLD  # τ: free if eigenvalue < τ·tr(G_p)/n
# Keep-exact directions: singular directions of the keep-exact vectors (projected on the free
# space) above this fraction of the longest vector's norm leave the free space (about float32
# encoder resolution times d, as in solve.operator_rank); what remains of them there is below it.
KEEP_EXACT_TOL = 1e-4


class NoFreeDirectionError(SolveError):
    """The threshold and keep-exact vectors leave no direction the edit may move."""


@dataclass(frozen=True)
class FreeSpace:
    """An orthonormal basis Q (d × r, float64) of the directions the update may use."""

    Q: torch.Tensor
    rank: int  # r, the kept rank
    preserve_rank: int  # directions the preserve Gram fixes (d − r before keep-exact)
    keep_exact_rank: int  # directions the keep-exact vectors fix on top
    bound: float  # sqrt(τ·tr(G_p)/n): ‖ΔW c_j‖ ≤ ‖ΔW‖₂·bound for a preserved c_j


def free_space(stats: EditStats, method: str, threshold: float) -> FreeSpace:
    """The free directions of one group: low-eigenvalue directions of G_p (null-space) or all
    (least-squares), less the keep-exact vectors' span.

    Raises:
        NoFreeDirectionError: nothing is left free (the message names the width and threshold).
    """
    d = stats.width
    device = stats.G_p.device
    eye = torch.eye(d, dtype=torch.float64, device=device)
    q, bound = eye, 0.0
    if method == "null-space":
        g_p = (stats.G_p + stats.G_p.T) / 2
        eig, vec = torch.linalg.eigh(g_p)  # ascending
        trace = float(eig.clamp_min(0).sum())
        if trace > 0:
            n = stats.n_preserve_vectors
            if n <= 0:
                raise SolveError(
                    "the null-space solve needs the number of preserve vectors "
                    "(EditStats.n_preserve_vectors) to scale its threshold"
                )
            level = threshold * trace / n  # τ times the mean squared norm of a preserve vector
            q, bound = vec[:, eig < level], level**0.5
    preserve_rank = d - q.shape[1]
    keep_rank = 0
    keep = stats.keep_exact
    if keep is not None and keep.numel() and q.shape[1]:
        keep = keep.to(device, torch.float64)
        b = q.T @ keep.T  # (r, n): keep-exact vectors in free coordinates
        u, s, _ = torch.linalg.svd(b, full_matrices=True)
        tol = KEEP_EXACT_TOL * float(keep.norm(dim=1).max())
        keep_rank = int((s > tol).sum())
        q = q @ u[:, keep_rank:]
    if q.shape[1] == 0:
        if preserve_rank == d:
            why = (
                f"null_space_threshold {threshold:g} leaves no direction of the preserve vectors' "
                f"{d}-d space below it — raise solver.null_space_threshold or preserve fewer concepts"
            )
        else:
            why = (
                f"the keep-exact vectors fix the last {keep_rank} free directions — drop "
                "solver.keep_exact"
                + (" or raise solver.null_space_threshold" if method == "null-space" else "")
            )
        raise NoFreeDirectionError(
            f"the edit has no free direction for the layers reading {d}-d embeddings: {why}"
        )
    return FreeSpace(q.contiguous(), q.shape[1], preserve_rank, keep_rank, bound)


def compressed_factor(m: torch.Tensor, space: FreeSpace) -> torch.Tensor:
    """Cholesky factor of Qᵀ M Q (r × r, float64), M = λI + s_e G_s + s_p G_p (``solve.gram_matrix``).

    Raises:
        SolveError: Qᵀ M Q not positive definite (λ = 0 with too few edit vectors in the free space).
    """
    q = space.Q
    a = q.T @ m @ q
    chol, info = torch.linalg.cholesky_ex((a + a.T) / 2)
    if int(info) != 0:
        raise SolveError(
            f"the null-space system is singular (Cholesky failed at column {int(info)} of "
            f"{space.rank}) — set solver.lambda > 0"
        )
    return chol


def project_update(r: torch.Tensor, space: FreeSpace, chol: torch.Tensor) -> torch.Tensor:
    """R · Q (Qᵀ M Q)⁻¹ Qᵀ for R (n × d), float64 (the erase scale is applied by the caller)."""
    q = space.Q
    rq = r @ q  # (n, r)
    # (Qᵀ M Q)⁻¹ symmetric: R Q A⁻¹ = (A⁻¹ Qᵀ Rᵀ)ᵀ
    return torch.cholesky_solve(rq.T.contiguous(), chol).T @ q.T


def operator(
    stats: EditStats, m: torch.Tensor, erase_scale: float, space: FreeSpace, chol: torch.Tensor
) -> torch.Tensor:
    """K = I + s_e (G_ts − G_s) Q (Qᵀ M Q)⁻¹ Qᵀ (d × d, float64): W_new = W_old·K."""
    eye = torch.eye(stats.width, dtype=torch.float64, device=m.device)
    return eye + erase_scale * project_update(stats.G_ts - stats.G_s, space, chol)


def layer_update(
    w_old: torch.Tensor,
    v_star_c: torch.Tensor,
    stats: EditStats,
    erase_scale: float,
    space: FreeSpace,
    chol: torch.Tensor,
) -> torch.Tensor:
    """W_new = W_old + s_e (Σ v*_i c_iᵀ − W_old G_s) Q (Qᵀ M Q)⁻¹ Qᵀ, for targets not linear in
    W_old (norm-relative debias); returned in W_old's dtype and device."""
    w = w_old.to(chol.device, torch.float64)
    r = v_star_c.to(w) - w @ stats.G_s
    return (w + erase_scale * project_update(r, space, chol)).to(w_old.device, w_old.dtype)
