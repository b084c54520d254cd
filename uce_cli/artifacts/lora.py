"""LoRA: the edit ΔW = W_old·(K − I) of each layer as exact (or rank-truncated) low-rank factors.

Since rank(K − I) ≤ number of edit vectors (docs/design.md), ΔW (d_out × d_in) factors exactly as
``lora_B · lora_A`` (d_out × r · r × d_in). An operator edit factors the group's K − I = U S Vᵀ once
(``factor_operator``: one float64 SVD of a d×d matrix), and every layer of the group is then
``lora_B = W_old U_r S_r``, ``lora_A = V_rᵀ``: one GEMM per layer (``operator_lora_factors``). An
edit without an operator (norm-relative debias, a merged delta) factors each ΔW from its own
float64 SVD (``factorize_delta``). Two key layouts, both loaded by diffusers'
``pipe.load_lora_weights``:

- ``diffusers`` (PEFT): ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``; no alpha, so the
  scale is 1 (diffusers' convention: alpha = rank per module);
- ``kohya`` (A1111, ComfyUI, sd-scripts): ``lora_unet_<module with _>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, one alpha (the largest rank) for every module and each up
  factor scaled by rank / alpha, so (alpha / rank)·up·down = ΔW.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from uce_cli.artifacts.files import EditFileError
from uce_cli.edit.solve import one_thread

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
LAYOUTS = ("diffusers", "kohya")


@dataclass(frozen=True)
class LoraFactors:
    """One layer's factors: ΔW ≈ up · down, with the truncation's relative Frobenius error."""

    up: torch.Tensor  # (d_out, r) = U_r S_r
    down: torch.Tensor  # (r, d_in) = V_rᵀ
    rank: int
    rel_error: float  # ‖ΔW − up·down‖_F / ‖ΔW‖_F, from the dropped singular values


def check_rank(rank: int | None, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a LoRA rank ≤ 0 or above a layer's size, naming the first layer it does not fit.

    Raises:
        EditFileError: the rank cannot be used.
    """
    if rank is None:
        return
    if rank <= 0:
        raise EditFileError(f"--lora-rank {rank}: the rank must be a positive integer")
    for key, (d_out, d_in) in shapes.items():
        if rank > min(d_out, d_in):
            raise EditFileError(
                f"--lora-rank {rank} exceeds layer {key} ({d_out}×{d_in}, at most rank "
                f"{min(d_out, d_in)}) — choose a rank ≤ {min(min(s) for s in shapes.values())} or leave it out for the exact rank"
            )


def factorize_delta(delta: torch.Tensor, rank: int | None = None) -> LoraFactors:
    """Factor one ΔW (d_out, d_in) from its float64 SVD.

    Args:
        delta: the layer's ΔW, any dtype (computed in float64).
        rank: keep this many singular values; None keeps the numerical rank (exact to float32).

    Returns:
        float32 factors; the rank is at least 1 (a zero ΔW gives zero factors).
    """
    dw = delta.to(torch.float64)
    with one_thread():
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    # "Exact" = exact to the float32 the factors are stored in: a singular value below σ₁·eps₃₂
    # changes ΔW by less than storing the factors rounds it (fp32 encoder noise sits there).
    tol = s[0] * torch.finfo(torch.float32).eps if s.numel() else 0.0
    exact = int((s > tol).sum())
    r = max(1, exact if rank is None else min(rank, exact))
    total = float((s**2).sum())
    dropped = float((s[r:] ** 2).sum())
    rel = (dropped / total) ** 0.5 if total > 0 else 0.0
    return LoraFactors(
        (u[:, :r] * s[:r]).to(torch.float32).contiguous(),
        vh[:r].to(torch.float32).contiguous(),
        r,
        rel,
    )


@dataclass(frozen=True)
class OperatorFactor:
    """One group's K − I = U S Vᵀ, factored once: each layer's ΔW = W_old(K − I) = (W_old U S)·Vᵀ."""

    k_minus_i: torch.Tensor  # (d, d) float64
    us: torch.Tensor  # (d, d) float64: U·S, columns by decreasing singular value
    vh: torch.Tensor  # (d, d) float64: Vᵀ
    rank: int  # numerical rank of K − I at float32 resolution (at least 1)


def factor_operator(k: torch.Tensor) -> OperatorFactor:
    """Factor K − I (d × d) once, in float64, for every layer of its group.

    The rank is cut where the factors stored in float32 could not tell the difference: a
    singular value below σ₁·eps₃₂ (fp32 encoder noise sits there).
    """
    k = k.to(torch.float64)
    k_minus_i = k - torch.eye(k.shape[0], dtype=k.dtype)
    with one_thread():
        u, s, vh = torch.linalg.svd(k_minus_i, full_matrices=False)
    tol = s[0] * torch.finfo(torch.float32).eps if s.numel() else 0.0
    return OperatorFactor(k_minus_i, u * s, vh, max(1, int((s > tol).sum())))


def operator_lora_factors(
    w_old: torch.Tensor, factor: OperatorFactor, rank: int | None = None
) -> LoraFactors:
    """One layer's factors of ΔW = W_old(K − I) from its group's shared factor: one GEMM, no SVD.

    Exact (``rank`` None): ``up = W_old U_r S_r``, ``down = V_rᵀ`` when the operator's rank r is
    at most the layer's d_out; a layer narrower than r is ΔW itself, ``up = I``, ``down = ΔW``
    (rank d_out, as its own SVD would give). Truncated: the best rank-``rank`` approximation of
    ΔW, from a thin SVD of the d_out × r product (not of ΔW).

    Args:
        w_old: the layer's weight on the group's columns (d_out, d), any dtype (used in float64).
        factor: the group's ``factor_operator(K)``.
        rank: keep this many directions; None keeps the exact rank.

    Returns:
        float32 factors and the relative Frobenius error of ``up·down`` against W_old(K − I).
    """
    w = w_old.to(torch.float64)
    d_out, r = w.shape[0], factor.rank
    if rank is None and r > d_out:
        delta = w @ factor.k_minus_i  # (d_out, d)
        up = torch.eye(d_out, dtype=torch.float32)
        return LoraFactors(up, delta.to(torch.float32).contiguous(), d_out, 0.0)
    a = w @ factor.us  # (d_out, d): ΔW = a · Vᵀ, Vᵀ orthonormal rows
    total = float((a**2).sum())
    dropped = float((a[:, r:] ** 2).sum())  # below float32 resolution by construction
    if rank is None:
        up, down = a[:, :r], factor.vh[:r]
    else:
        with one_thread():
            p, sig, qh = torch.linalg.svd(a[:, :r], full_matrices=False)
        tol = sig[0] * torch.finfo(torch.float32).eps if sig.numel() else 0.0
        r = max(1, min(rank, int((sig > tol).sum())))
        dropped += float((sig[r:] ** 2).sum())
        up, down = p[:, :r] * sig[:r], qh[:r] @ factor.vh[: qh.shape[1]]
    rel = (dropped / total) ** 0.5 if total > 0 else 0.0
    return LoraFactors(
        up.to(torch.float32).contiguous(), down.to(torch.float32).contiguous(), r, rel
    )


def _module(key: str) -> str:
    """``down_blocks.0...attn2.to_k.weight`` → ``down_blocks.0...attn2.to_k``."""
    return key.removesuffix(".weight")


def kohya_name(key: str) -> str:
    """A diffusers UNet key → its kohya module name (``lora_unet_down_blocks_0_..._to_k``)."""
    return "lora_unet_" + _module(key).replace(".", "_")


def lora_state_dict(
    factors: dict[str, LoraFactors],
    layout: str,
    denoiser: str = "unet",
    kohya: Callable[[str], str | None] = kohya_name,
) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in the given key layout (``diffusers`` or ``kohya``).

    ``kohya`` names a key's kohya module (the family's ``kohya_name``).
    """
    state: dict[str, torch.Tensor] = {}
    # kohya scales each module by alpha / rank. One alpha for all modules (the largest rank), with
    # each up factor scaled by rank / alpha, keeps ΔW = up·down exactly: diffusers' kohya loader
    # mis-keys per-module alphas that differ (its alpha_pattern), which rescaled those modules.
    alpha = max((f.rank for f in factors.values()), default=1)
    for key, f in factors.items():
        if layout == "diffusers":
            state[f"{denoiser}.{_module(key)}.lora_A.weight"] = f.down
            state[f"{denoiser}.{_module(key)}.lora_B.weight"] = f.up
        else:
            name = kohya(key)
            if name is None:
                raise EditFileError(f"{denoiser}.{key} has no kohya LoRA name")
            state[f"{name}.lora_down.weight"] = f.down
            state[f"{name}.lora_up.weight"] = (
                f.up if f.rank == alpha else (f.up.double() * (f.rank / alpha)).float()
            )
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def is_lora(keys: list[str]) -> bool:
    """True when every key is a LoRA factor or alpha (either layout)."""
    return bool(keys) and all("lora" in k or k.endswith(".alpha") for k in keys)


def read_lora_deltas(
    tensors: dict[str, torch.Tensor],
    kv_keys: list[str],
    denoiser: str = "unet",
    kohya: Callable[[str], str | None] = kohya_name,
) -> dict[str, torch.Tensor]:
    """ΔW (float64) per base k/v key from a LoRA state dict in either layout.

    Args:
        tensors: the LoRA file's tensors.
        kv_keys: the base model's k/v keys (kohya names are matched against them).
        denoiser: the component prefix of the diffusers layout.
        kohya: a key's kohya module name (the family's ``kohya_name``).

    Raises:
        EditFileError: a LoRA module that is not a k/v projection of this base, or a missing factor.
    """
    by_kohya = {name: k for k in kv_keys if (name := kohya(k)) is not None}
    by_module = {f"{denoiser}.{_module(k)}": k for k in kv_keys}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        for suffix, role in (
            (".lora_A.weight", "down"),
            (".lora_B.weight", "up"),
            (".lora_down.weight", "down"),
            (".lora_up.weight", "up"),
            (".alpha", "alpha"),
        ):
            if name.endswith(suffix):
                module = name.removesuffix(suffix)
                key = by_module.get(module) or by_kohya.get(module)
                if key is None:
                    raise EditFileError(
                        f"LoRA tensor '{name}' targets '{module}', which is not a cross-attention k/v "
                        "projection of this base model — wrong base, or not a uce edit"
                    )
                pairs.setdefault(key, {})[role] = t
                break
        else:
            raise EditFileError(
                f"LoRA tensor '{name}' is neither a lora_A/lora_B/lora_down/lora_up factor nor an alpha"
            )
    deltas: dict[str, torch.Tensor] = {}
    for key, p in pairs.items():
        if "up" not in p or "down" not in p:
            raise EditFileError(
                f"LoRA for {key} lacks its {'up (lora_B)' if 'up' not in p else 'down (lora_A)'} factor"
            )
        up, down = p["up"].to(torch.float64), p["down"].to(torch.float64)
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise EditFileError(
                f"LoRA for {key}: factors {tuple(up.shape)} · {tuple(down.shape)} do not multiply"
            )
        scale = float(p["alpha"]) / up.shape[1] if "alpha" in p else 1.0
        deltas[key] = scale * (up @ down)
    return deltas
