"""The UCE closed form (paper Eq. 7 with the λ ridge term), in float64; returns new tensors.

For one projection ``W_old`` (d_out × d_in), edit vectors ``c_i`` with targets ``v*_i`` and
preserve vectors ``c_j``::

    W = (λ W_old + s_e Σ v*_i c_iᵀ + s_p Σ W_old c_j c_jᵀ) · M⁻¹,
    M = λ I + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ                      (symmetric, d_in × d_in)

When every target is linear in W_old (v*_i = W_old c*_i: erase, moderate, debias Eq. 9,
preserve), ``W = W_old · K`` with ``K = I + s_e (G_ts − G_s) M⁻¹`` shared by every layer that reads
the same embeddings: one factorization, then one GEMM per layer.

Norm-relative debias targets (the published code, ``alpha_scale: relative``) are not linear in
W_old: per layer and prompt, T ← W·C, then for each attribute T ← T + α_j·‖T‖_F·(W·A_j)/‖W·A_j‖_F.
Their Σ T Cᵀ is built per layer (``debias_numerator``) and the general form is solved with the
same shared factor of M (``solve_layer``); such an edit has no operator K.

Invariant: M is built and factorized in float64 (measured cond(M) ≈ 5·10⁸; fp32 gives O(1)
error), never inverted explicitly, and K is kept in float64. Applying K is one GEMM per layer,
``W_new = W_old + W_old·(K − I)``, run in float32 for weights stored in 32 bits or less (float64
for float64 weights) and cast back to the weight dtype once. The per-layer figures are trace
forms of d×d float64 matrices with one Gram W_oldᵀW_old per layer, formed in the same precision.
Measured on the 32 SD-1.4-shaped layers (random weights, a 2-artist erase whose ‖ΔW‖ exceeds
‖W_old‖): weights within 2.5·10⁻⁷ of the float64 product (relative Frobenius; storing the float64
result in float32 alone rounds it by 2.5·10⁻⁸), figures within 3·10⁻⁸ relative, and the two
per-layer GEMMs at half their float64 cost. Every input and result is checked finite: a
non-finite tensor stops the edit with an error naming it, before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from uce_cli.edit import nullspace
from uce_cli.edit.stats import DebiasBlock, EditStats
from uce_cli.errors import ModelError, SolveError

METHODS = ("least-squares", "null-space")


@dataclass(frozen=True)
class Scales:
    """λ, s_e and s_p of the closed form, and the solver method (``uce_cli.edit.nullspace``).

    ``least-squares`` is UCE's closed form; ``null-space`` restricts the update to the directions
    whose preserve-Gram eigenvalues are below ``null_space_threshold`` times the mean squared norm
    of a preserve vector (relative).
    """

    lam: float
    erase_scale: float
    preserve_scale: float
    method: str = "least-squares"
    null_space_threshold: float = nullspace.DEFAULT_THRESHOLD


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed d×d factorizations (Cholesky, eigvalsh, SVD) on one CPU thread.

    They synchronise their threads thousands of times; on a machine with other work those
    barriers wait for descheduled threads. Measured on the 2-core CI machine with other jobs
    running, d = 768: Cholesky 0.13 s on two threads vs 0.012 s on one, eigvalsh 11.6 s vs
    0.04 s, a 1280×768 SVD 3.3 s vs 0.32 s. Small memory-bound passes (finite checks,
    conversions) run here too; the per-layer GEMMs keep every thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def nonfinite_count(t: torch.Tensor) -> int:
    """Number of NaN or ±inf entries of a tensor (0 for integer tensors)."""
    if not t.is_floating_point():
        return 0
    with one_thread():  # a memory-bound pass: threads only add a barrier
        if bool(torch.isfinite(t.sum(dtype=compute_dtype(t.dtype)))):
            return 0  # NaN and inf propagate through a sum: one pass, no mask, the common case
        return int((~torch.isfinite(t)).sum())  # exact (large finite values may overflow a sum)


def check_scales(scales: Scales) -> None:
    """Refuse a non-finite solver scale (recipes are validated; this guards library callers).

    Raises:
        SolveError: naming the scale and its value.
    """
    for name, value in (
        ("solver.lambda", scales.lam),
        ("solver.erase_scale", scales.erase_scale),
        ("solver.preserve_scale", scales.preserve_scale),
    ):
        if not math.isfinite(value):
            raise SolveError(f"{name} is {value} — solver scales must be finite numbers")
    if scales.method not in METHODS:
        raise SolveError(f"solver.method is {scales.method!r} — use one of: {', '.join(METHODS)}")
    tau = scales.null_space_threshold
    if not (math.isfinite(tau) and 0 < tau <= 1):
        raise SolveError(
            f"solver.null_space_threshold is {tau} — a relative eigenvalue threshold in (0, 1] "
            f"(default {nullspace.DEFAULT_THRESHOLD:g})"
        )


def check_statistics(stats: EditStats) -> None:
    """Refuse non-finite Gram statistics, saying which vectors they came from.

    Raises:
        SolveError: naming the matrices and the likely cause.
    """
    bad = [name for name in ("G_s", "G_p", "G_ts", "G_t") if nonfinite_count(getattr(stats, name))]
    if not bad:
        return
    if set(bad) <= {"G_ts", "G_t"}:
        cause = (
            "the edit targets overflow: target weights (debias alphas) or guide embeddings too "
            "large — use alphas of moderate size (|alpha| ≤ 10 or so)"
        )
    else:
        cause = (
            "the text encoder produced non-finite embeddings — its weights hold NaN/inf, or it "
            "overflows in fp16/bf16 (try --dtype fp32)"
        )
    raise SolveError(f"the edit statistics {', '.join(bad)} are not finite: {cause}")


def check_base_weights(weights: dict[str, torch.Tensor], origin: dict[str, str] | None) -> None:
    """Refuse a base weight with NaN/inf entries, naming the tensor and the file it came from.

    Raises:
        ModelError: the base model is corrupt.
    """
    for name, w in weights.items():
        n = nonfinite_count(w)
        if n:
            where = f" in {origin[name]}" if origin and name in origin else ""
            raise ModelError(
                f"base weight {name}{where} has {n} non-finite values (NaN/inf) — the base model "
                "is corrupt: re-download or re-convert it"
            )


def check_result(name: str, w: torch.Tensor, scales: Scales | None = None) -> None:
    """Refuse an edited tensor with NaN/inf entries before anything is written.

    Raises:
        SolveError: naming the layer and the likely cause.
    """
    n = nonfinite_count(w)
    if not n:
        return
    hint = "the edit overflows"
    if w.dtype in (torch.float16, torch.bfloat16):
        hint += f" {str(w.dtype).removeprefix('torch.')} (the weights' dtype)"
    if scales is not None:
        hint += (
            f": solver scales (lambda={scales.lam:g}, erase_scale={scales.erase_scale:g}, "
            f"preserve_scale={scales.preserve_scale:g}) or target weights (debias alphas) too large"
        )
    raise SolveError(
        f"layer {name}: the edited weight has {n} non-finite values (NaN/inf) — {hint}; "
        "nothing was written"
    )


def gram_matrix(stats: EditStats, scales: Scales) -> torch.Tensor:
    """M = λI + s_e G_s + s_p G_p, float64, exactly symmetric."""
    eye = torch.eye(stats.width, dtype=torch.float64, device=stats.G_s.device)
    m = scales.lam * eye + scales.erase_scale * stats.G_s + scales.preserve_scale * stats.G_p
    return (m + m.T) / 2


def checked_gram_matrix(stats: EditStats, scales: Scales) -> torch.Tensor:
    """M of finite scales and statistics, refused when it overflows.

    Raises:
        SolveError: non-finite scales or statistics, or an M that is not finite.
    """
    check_scales(scales)
    check_statistics(stats)
    m = gram_matrix(stats, scales)
    if nonfinite_count(m):
        raise SolveError(
            f"the Gram matrix M overflows (solver scales lambda={scales.lam:g}, "
            f"erase_scale={scales.erase_scale:g}, preserve_scale={scales.preserve_scale:g}) — "
            "use scales of moderate size"
        )
    return m


def factorize(stats: EditStats, scales: Scales) -> torch.Tensor:
    """Cholesky factor of M, refusing a singular system with a message the user can act on.

    Raises:
        SolveError: non-finite scales or statistics, M singular (λ = 0 with too few edit/preserve
            vectors) or not positive definite.
    """
    m = checked_gram_matrix(stats, scales)
    d = stats.width
    if scales.lam == 0:
        with one_thread():
            eig = torch.linalg.eigvalsh(m)
        rank = int((eig > eig.max().clamp_min(1e-300) * d * torch.finfo(torch.float64).eps).sum())
        if rank < d:
            raise SolveError(
                f"the system is singular: solver.lambda is 0 and the edit and preserve vectors span "
                f"only {rank} of {d} dimensions — set solver.lambda > 0 (paper default 0.5) or "
                "preserve more concepts"
            )
    with one_thread():
        chol, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise SolveError(
            f"the Gram matrix is not positive definite (Cholesky failed at column {int(info)}) — "
            "increase solver.lambda"
        )
    return chol


def solve_operator(
    stats: EditStats, scales: Scales, chol: torch.Tensor | None = None
) -> torch.Tensor:
    """The edit operator K (d_in × d_in, float64) with W_new = W_old · K for linear targets.

    K = I + s_e (G_ts − G_s) M⁻¹; computed as Kᵀ = I + s_e M⁻¹ (G_ts − G_s)ᵀ since M is symmetric.
    """
    chol = factorize(stats, scales) if chol is None else chol
    rhs = (stats.G_ts - stats.G_s).T.contiguous()  # (d, d)
    eye = torch.eye(stats.width, dtype=torch.float64, device=chol.device)
    with one_thread():
        k = (eye + scales.erase_scale * torch.cholesky_solve(rhs, chol)).T
    if nonfinite_count(k):
        raise SolveError(
            f"the edit operator K is not finite — the solve overflowed (solver scales "
            f"lambda={scales.lam:g}, erase_scale={scales.erase_scale:g}, "
            f"preserve_scale={scales.preserve_scale:g}): use scales of moderate size"
        )
    return k


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a layer's GEMMs run in: its own dtype promoted to at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _apply(w_old: torch.Tensor, k_minus_i: torch.Tensor) -> torch.Tensor:
    """W_old + W_old·(K − I) with (K − I) already in the layer's compute dtype and device."""
    w = w_old.to(k_minus_i.device, k_minus_i.dtype)
    # (d_out, d_in) + (d_out, d_in)·(d_in, d_in): the identity part is added exactly, so the
    # float32 rounding of the product scales with ‖ΔW‖, not with ‖W_old‖.
    return torch.addmm(w, w, k_minus_i).to(w_old.device, w_old.dtype)


def apply_operator(w_old: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """W_new = W_old · K (as W_old + W_old·(K − I), in the compute dtype), in W_old's dtype and device."""
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return _apply(w_old, (k - eye).to(compute_dtype(w_old.dtype)))


def operator_rank(k: torch.Tensor) -> int:
    """Numerical rank of K − I (≤ the number of edit vectors) at float32 resolution.

    Counts singular values σ > σ₁·d·eps₃₂ (smaller ones are float32 encoder noise amplified by
    cond(M)), as eigenvalues σ² of (K − I)(K − I)ᵀ in float64, whose absolute accuracy
    (eps₆₄·σ₁²) lies far below that threshold: the same count as a float64 SVD (515 of 768 on
    the SD-1.4-shaped benchmark) at half its cost.
    """
    a = k - torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    with one_thread():
        eig = torch.linalg.eigvalsh((a @ a.T).to(torch.float64))
    tol = eig.max().clamp_min(1e-300) * (k.shape[0] * torch.finfo(torch.float32).eps) ** 2
    return int((eig > tol).sum())


def solve_layer(
    w_old: torch.Tensor,
    v_star_c: torch.Tensor,
    stats: EditStats,
    scales: Scales,
    chol: torch.Tensor,
) -> torch.Tensor:
    """The general per-layer closed form, for targets that are not linear in W_old.

    Args:
        w_old: (d_out, d_in) weight.
        v_star_c: (d_out, d_in) Σ_i v*_i c_iᵀ for this layer.
        stats: the edit statistics (G_p is used for the preserve term).
        scales: λ, s_e, s_p.
        chol: Cholesky factor of M from ``factorize`` (shared by all layers of this width).
    """
    w = w_old.to(chol.device, torch.float64)
    numer = (
        scales.lam * w
        + scales.erase_scale * v_star_c.to(w)
        + scales.preserve_scale * (w @ stats.G_p)
    )
    # W = numer · M⁻¹  ⇔  Wᵀ = M⁻¹ numerᵀ (M symmetric)
    return torch.cholesky_solve(numer.T.contiguous(), chol).T.to(w_old.device, w_old.dtype)


def stack_blocks(blocks: list[DebiasBlock]) -> tuple[torch.Tensor, torch.Tensor]:
    """All blocks' vectors stacked once for every layer: X = [C; A_1; …; A_J] per block, and C.

    Returns:
        ((Σ (1+J)K, d) rows of every block, (Σ K, d) rows of the prompts), float64.
    """
    xs = [torch.cat([b.C, b.A.reshape(-1, b.C.shape[1])]) for b in blocks]
    return torch.cat(xs).to(torch.float64), torch.cat([b.C for b in blocks]).to(torch.float64)


def debias_numerator(
    w_old: torch.Tensor,
    blocks: list[DebiasBlock],
    stacked: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """Σ_i T_i C_iᵀ of one layer's debias targets, and Σ_i ‖T_i‖²_F (for the residual figure).

    For each block, in the order of its attributes (the published code updates T in place, so
    ‖T‖ is taken after the previous attribute's addition)::

        T ← W·C;  T ← T + α_j·‖T‖_F·(W·A_j)/‖W·A_j‖_F   (relative)
        T ← W·C + Σ_j α_j·W·A_j                           (absolute, Eq. 9)

    with Frobenius norms over the block's aligned positions. Rows here are vectors: T is (K, d_out).
    Two GEMMs per layer serve every block (W·X for all blocks, then Tᵀ·C).

    Args:
        w_old: (d_out, d_in) weight of the layer.
        blocks: the debias blocks.
        stacked: ``stack_blocks(blocks)``, to build once for all layers.

    Returns:
        ((d_out, d_in) float64 numerator term, float target energy).
    """
    w = w_old.to(torch.float64)
    if not blocks:
        return torch.zeros_like(w), 0.0
    x_all, c_all = stack_blocks(blocks) if stacked is None else stacked
    y = x_all.to(w.device) @ w.T  # (Σ (1+J)K, d_out): W·x for every row
    targets = []
    offset = 0
    for block in blocks:
        k = block.C.shape[0]
        t = y[offset : offset + k].clone()
        for j, alpha in enumerate(block.alphas):
            u = y[offset + (j + 1) * k : offset + (j + 2) * k]
            t += alpha * t.norm() * u / u.norm() if block.relative else alpha * u
        targets.append(t)
        offset += (len(block.alphas) + 1) * k
    t_all = torch.cat(targets)  # (Σ K, d_out)
    return t_all.T @ c_all.to(w.device), float(t_all.square().sum())


def debias_targets(
    w_old: torch.Tensor,
    stats: EditStats,
    stacked_blocks: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    """One layer's Σ v*_i c_iᵀ (float64, d_out × d_in) with norm-relative debias targets, and
    the targets' energy Σ ‖v*_i‖² (for the residual figures)."""
    w0 = w_old.to(device, torch.float64)
    numer, energy = debias_numerator(w0, stats.debias, stacked_blocks)
    return w0 @ stats.G_ts + numer, energy + _trace_form(w0, stats.G_t)


def fold_linear_blocks(stats: EditStats) -> EditStats:
    """Statistics with the absolute (Eq. 9) debias blocks folded into G_ts/G_t (they are linear in
    W_old); the relative blocks stay blocks. Returns a new object; ``stats`` is unchanged."""
    linear = [b for b in stats.debias if not b.relative]
    if not linear:
        return stats
    g_ts, g_t = stats.G_ts.clone(), stats.G_t.clone()
    for block in linear:
        c = block.C.to(g_ts.device)
        c_star = c + sum(a * block.A[j].to(c.device) for j, a in enumerate(block.alphas))  # (K, d)
        g_ts += c_star.T @ c
        g_t += c_star.T @ c_star
    return replace(stats, G_ts=g_ts, G_t=g_t, debias=[b for b in stats.debias if b.relative])


def per_layer_metrics(
    w_old: torch.Tensor,
    w_new: torch.Tensor,
    v_star_c: torch.Tensor,
    energy: float,
    stats: EditStats,
) -> dict[str, float]:
    """The figures of ``layer_metrics`` for a per-layer solve, from its numerator terms.

    ``Σ‖W c_i − v*_i‖² = tr(W G_s Wᵀ) − 2⟨W, Σ v*_i c_iᵀ⟩ + Σ‖v*_i‖²``, with v_star_c = Σ v*_i c_iᵀ
    and energy = Σ‖v*_i‖².
    """
    dev = stats.G_s.device
    w0, w1 = w_old.to(dev, torch.float64), w_new.to(dev, torch.float64)
    v = v_star_c.to(dev, torch.float64)

    def residual(w: torch.Tensor) -> float:
        value = _trace_form(w, stats.G_s) - 2 * float((w * v).sum()) + energy
        return (max(value, 0.0) / energy) ** 0.5 if energy > 0 else 0.0

    preserve = _trace_form(w0, stats.G_p)
    return {
        "rel_delta": float((w1 - w0).norm() / w0.norm().clamp_min(1e-300)),
        "residual_before": residual(w0),
        "residual_after": residual(w1),
        "preserve_drift": (_trace_form(w1 - w0, stats.G_p) / preserve) ** 0.5
        if preserve > 0
        else 0.0,
    }


def _trace_form(w: torch.Tensor, g: torch.Tensor) -> float:
    """tr(W G Wᵀ) = ‖W C‖²_F when G = C Cᵀ."""
    return float(((w @ g) * w).sum().clamp_min(0))


def layer_metrics(w_old: torch.Tensor, w_new: torch.Tensor, stats: EditStats) -> dict[str, float]:
    """Diagnostics of one edited layer, all from the d×d statistics (no per-vector pass).

    - ``rel_delta``: ‖ΔW‖ / ‖W_old‖
    - ``residual_before`` / ``residual_after``: ‖W C_s − V*‖ / ‖V*‖ with V* = W_old C*
    - ``preserve_drift``: ‖ΔW C_p‖ / ‖W_old C_p‖
    """
    dev = stats.G_s.device
    w0 = w_old.to(dev, torch.float64)
    w1 = w_new.to(dev, torch.float64)
    dw = w1 - w0
    g_st = stats.G_ts.T
    target = _trace_form(w0, stats.G_t)

    # ‖W C_s − W_old C*‖² = tr(W G_s Wᵀ) − 2 tr(W C_s C*ᵀ W_oldᵀ) + tr(W_old G_t W_oldᵀ)
    def residual(w: torch.Tensor) -> float:
        cross = float(((w @ g_st) * w0).sum())
        return max(_trace_form(w, stats.G_s) - 2 * cross + target, 0.0)

    preserve = _trace_form(w0, stats.G_p)
    return {
        "rel_delta": float(dw.norm() / w0.norm().clamp_min(1e-300)),
        "residual_before": (residual(w0) / target) ** 0.5 if target > 0 else 0.0,
        "residual_after": (residual(w1) / target) ** 0.5 if target > 0 else 0.0,
        "preserve_drift": (_trace_form(dw, stats.G_p) / preserve) ** 0.5 if preserve > 0 else 0.0,
    }


@dataclass(frozen=True)
class MetricForms:
    """d×d matrices X with each per-layer figure a trace form tr(W_old X W_oldᵀ) = ⟨X, W_oldᵀW_old⟩.

    They depend on the edit only, so each layer's figures cost one Gram W_oldᵀW_old.
    """

    delta: torch.Tensor  # (K−I)(K−I)ᵀ → ‖ΔW‖²
    residual_before: torch.Tensor  # (C_s−C*)(C_s−C*)ᵀ → ‖W_old C_s − V*‖²
    residual_after: torch.Tensor  # (K C_s−C*)(K C_s−C*)ᵀ → ‖W_new C_s − V*‖²
    target: torch.Tensor  # C* C*ᵀ → ‖V*‖²
    preserve: torch.Tensor  # C_p C_pᵀ → ‖W_old C_p‖²
    drift: torch.Tensor  # (K−I) C_p C_pᵀ (K−I)ᵀ → ‖ΔW C_p‖²

    def stacked(self) -> torch.Tensor:
        """(6, d²) float64: the forms above as rows, in field order (one GEMV per layer)."""
        rows = [
            self.delta,
            self.residual_before,
            self.residual_after,
            self.target,
            self.preserve,
            self.drift,
        ]
        return torch.stack(rows).reshape(len(rows), -1)


def metric_forms(k: torch.Tensor, stats: EditStats) -> MetricForms:
    """The trace-form matrices of an operator edit W_new = W_old K (float64)."""
    eye = torch.eye(stats.width, dtype=torch.float64, device=k.device)
    k_i = k - eye
    g_st = stats.G_ts.T  # C_s C*ᵀ
    k_g_st = k @ g_st  # its transpose is G_ts Kᵀ
    return MetricForms(
        delta=k_i @ k_i.T,
        residual_before=stats.G_s - g_st - stats.G_ts + stats.G_t,
        residual_after=k @ stats.G_s @ k.T - k_g_st - k_g_st.T + stats.G_t,
        target=stats.G_t,
        preserve=stats.G_p,
        drift=k_i @ stats.G_p @ k_i.T,
    )


def _figures(values: list[float], w_norm2: float) -> dict[str, float]:
    """Per-layer figures from the six trace forms (field order of MetricForms) and ‖W_old‖²."""
    delta, before, after, target, preserve, drift = (max(v, 0.0) for v in values)

    def ratio(num: float, den: float) -> float:
        return (num / den) ** 0.5 if den > 0 else 0.0

    return {
        "rel_delta": ratio(delta, w_norm2),
        "residual_before": ratio(before, target),
        "residual_after": ratio(after, target),
        "preserve_drift": ratio(drift, preserve),
    }


def layer_figures(w_old: torch.Tensor, stacked: torch.Tensor) -> dict[str, float]:
    """The figures of ``layer_metrics`` for W_new = W_old K, from one Gram of W_old.

    Args:
        w_old: (d_out, d_in) weight.
        stacked: ``metric_forms(K, stats).stacked()``, shared by every layer.
    """
    w = w_old.to(stacked.device, compute_dtype(w_old.dtype))
    gram = w.T @ w  # (d_in, d_in), formed in the compute dtype
    with one_thread():
        gram = gram.to(torch.float64)
        return _figures((stacked @ gram.reshape(-1)).tolist(), float(gram.trace()))


def solve_edit(
    weights: dict[str, torch.Tensor],
    stats: EditStats,
    scales: Scales,
    origin: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, dict[str, float]]]:
    """Edit every given projection: one shared operator, or per layer with norm-relative debias.

    Args:
        weights: name → W_old (d_out, d_in), all reading embeddings of width ``stats.width``.
        stats: the edit's Gram statistics (and debias blocks).
        scales: λ, s_e, s_p.
        origin: name → the file each W_old was read from (named when a base weight is not finite).

    Returns:
        New weights (same names, dtypes and devices), the operator K (None when a norm-relative
        debias target makes the edit per-layer), and per-layer metrics.

    Raises:
        ModelError: a base weight holds NaN/inf.
        SolveError: a width mismatch, a singular system, or a non-finite statistic, operator or
            edited weight (naming it and the likely cause).
    """
    for name, w_old in weights.items():
        if w_old.shape[1] != stats.width:
            raise SolveError(
                f"{name}: input width {w_old.shape[1]} != embedding width {stats.width}"
            )
    check_base_weights(weights, origin)
    stats = fold_linear_blocks(stats)
    if scales.method != "least-squares" or stats.keep_exact is not None:
        return solve_constrained(weights, stats, scales)
    new: dict[str, torch.Tensor] = {}
    metrics: dict[str, dict[str, float]] = {}
    if stats.debias:
        # One factor of M serves every layer; only the numerator is per layer.
        chol = factorize(stats, scales)
        stacked_blocks = stack_blocks(stats.debias)
        stacked_blocks = (stacked_blocks[0].to(chol.device), stacked_blocks[1].to(chol.device))
        for name, w_old in weights.items():
            v_star_c, energy = debias_targets(w_old, stats, stacked_blocks, chol.device)
            new[name] = solve_layer(w_old, v_star_c, stats, scales, chol)
            check_result(name, new[name], scales)
            metrics[name] = per_layer_metrics(w_old, new[name], v_star_c, energy, stats)
        return new, None, metrics
    k = solve_operator(stats, scales)
    stacked = metric_forms(k, stats).stacked()
    eye = torch.eye(stats.width, dtype=torch.float64, device=k.device)
    k_minus_i: dict[torch.dtype, torch.Tensor] = {}  # per compute dtype, cast once
    for name, w_old in weights.items():
        dtype = compute_dtype(w_old.dtype)
        if dtype not in k_minus_i:
            k_minus_i[dtype] = (k - eye).to(dtype)
        new[name] = _apply(w_old, k_minus_i[dtype])
        check_result(name, new[name], scales)
        metrics[name] = layer_figures(w_old, stacked)
    return new, k, metrics


def solve_constrained(
    weights: dict[str, torch.Tensor], stats: EditStats, scales: Scales
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, dict[str, float]]]:
    """``solve_edit`` with the update restricted to free directions (``uce_cli.edit.nullspace``):
    the null-space method, or least squares with keep-exact vectors. Same returns; each layer's
    metrics add ``kept_rank`` (free directions), ``fixed_rank_preserve``/``fixed_rank_keep_exact``
    and ``preserve_bound`` (sqrt(τ·tr(G_p)/n): ‖ΔW c_j‖ ≤ ‖ΔW‖₂·bound; 0 for least squares).

    Raises:
        SolveError: as ``solve_edit``; ``nullspace.NoFreeDirectionError`` when nothing is free.
    """
    m = checked_gram_matrix(stats, scales)
    with one_thread():
        space = nullspace.free_space(stats, scales.method, scales.null_space_threshold)
        chol = nullspace.compressed_factor(m, space)
    extra = {
        "kept_rank": float(space.rank),
        "fixed_rank_preserve": float(space.preserve_rank),
        "fixed_rank_keep_exact": float(space.keep_exact_rank),
        "preserve_bound": space.bound,
    }
    new: dict[str, torch.Tensor] = {}
    metrics: dict[str, dict[str, float]] = {}
    if stats.debias:
        stacked_blocks = stack_blocks(stats.debias)
        stacked_blocks = (stacked_blocks[0].to(chol.device), stacked_blocks[1].to(chol.device))
        for name, w_old in weights.items():
            v_star_c, energy = debias_targets(w_old, stats, stacked_blocks, chol.device)
            new[name] = nullspace.layer_update(
                w_old, v_star_c, stats, scales.erase_scale, space, chol
            )
            check_result(name, new[name], scales)
            metrics[name] = {
                **per_layer_metrics(w_old, new[name], v_star_c, energy, stats),
                **extra,
            }
        return new, None, metrics
    with one_thread():
        k = nullspace.operator(stats, m, scales.erase_scale, space, chol)
    if nonfinite_count(k):
        raise SolveError(
            "the edit operator K is not finite — the solve overflowed: use scales of moderate size"
        )
    stacked = metric_forms(k, stats).stacked()
    eye = torch.eye(stats.width, dtype=torch.float64, device=k.device)
    k_minus_i: dict[torch.dtype, torch.Tensor] = {}
    for name, w_old in weights.items():
        dtype = compute_dtype(w_old.dtype)
        if dtype not in k_minus_i:
            k_minus_i[dtype] = (k - eye).to(dtype)
        new[name] = _apply(w_old, k_minus_i[dtype])
        check_result(name, new[name], scales)
        metrics[name] = {**layer_figures(w_old, stacked), **extra}
    return new, k, metrics
