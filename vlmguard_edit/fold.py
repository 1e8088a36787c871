"""Pure tensor math of the edit: M = I + beta * V^T V applied to residual writers.

Tensors in, tensors out. The math is done in float32, the result is cast back to the input
dtype once, and non-finite results are refused. Nothing here knows about files or models.
"""

from __future__ import annotations

import torch

from .errors import DirectionError, PlanError


def check_orthonormal(v: torch.Tensor, where: str, tol: float = 1e-4) -> None:
    """V (m, d) must have orthonormal rows; otherwise M is not the intended map."""
    if v.ndim != 2:
        raise PlanError(
            f"{where}: direction must be 2-D (rank, hidden), got shape {tuple(v.shape)}"
        )
    gram = v.double() @ v.double().T  # (m, m)
    err = (gram - torch.eye(v.shape[0], dtype=torch.float64)).abs().max().item()
    if err > tol:
        raise PlanError(f"{where}: direction rows are not orthonormal (max |VV^T - I| = {err:.2e})")


def apply_map(x: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """Return (I + beta V^T V) applied to the hidden dimension (dim 0) of x.

    x: (d,) bias or (d, k) weight of a Linear that writes d features.  v: (m, d).
    Computed as x + beta * V^T (V x), a rank-m update, in float32; cast back once.
    """
    dtype = x.dtype
    # A private float32 copy, updated in place: peak memory is one float32 copy of x
    # plus the (m, k) coefficients, whatever the rank.
    x32 = x.to(torch.float32, copy=True)
    v32 = v.to(torch.float32)
    coeff = v32 @ x32  # (m, d) @ (d, k) -> (m, k)   or (m, d) @ (d,) -> (m,)
    if x32.ndim == 1:
        x32.add_(v32.T @ coeff, alpha=beta)  # (d, m) @ (m,) -> (d,)
    else:
        x32.addmm_(v32.T, coeff, alpha=beta)  # (d, m) @ (m, k) -> (d, k)
    # One reduction instead of an elementwise isfinite (50x faster, no temporary): any inf or
    # nan makes the sum non-finite, and an overflow (needs mean |w| ~ 1e31) can only refuse.
    if not torch.isfinite(x32.sum()):
        raise PlanError("edited tensor has non-finite values; check the direction and beta")
    return x32 if dtype == torch.float32 else x32.to(dtype)


def shift(bias: torch.Tensor, u: torch.Tensor, gamma: float) -> torch.Tensor:
    """b + gamma * u, in float32, cast back once; refuses non-finite results."""
    out = bias.to(torch.float32) + gamma * u.to(torch.float32)  # (d,)
    if not torch.isfinite(out).all():
        raise PlanError("shifted bias has non-finite values; check the direction and gamma")
    return out.to(bias.dtype)


def map_hidden(h: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """Apply (I + beta V^T V) to the last dim of activations h (..., d); used by runtime hooks."""
    h32 = h.to(torch.float32)
    v32 = v.to(device=h.device, dtype=torch.float32)
    out = h32 + beta * ((h32 @ v32.T) @ v32)  # (..., d) @ (d, m) -> (..., m) @ (m, d) -> (..., d)
    return out.to(h.dtype)


def attention_direction(
    o_proj: torch.Tensor,
    v_proj: torch.Tensor,
    gain: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """The unit state u that a layer's attention maps most strongly onto direction v.

    An image token in state h contributes, through head k, W_o^k W_v^k (g ⊙ h / rms(h)) to a
    reading token's residual. Its component along v is (g ⊙ M^T v) . h / rms(h), with
    M = Σ_k W_o^k W_v^{kv(k)}; so over states of a given norm, u ∝ g ⊙ M^T v is the one that
    pushes the reader furthest along v (exactly so when attention spreads evenly over heads).

    o_proj: (d, H*hd)   v_proj: (KV*hd, d)   gain: (d,)   v: (d,)   ->   u: (d,), unit norm
    """
    wo, wv = o_proj.float(), v_proj.float()
    head_dim = wo.shape[1] // num_heads
    group = num_heads // num_kv_heads
    mapped = torch.zeros(wo.shape[0], dtype=torch.float32)  # M^T v, built head by head
    vv = v.float()
    for head in range(num_heads):
        kv = head // group
        wo_h = wo[:, head * head_dim : (head + 1) * head_dim]  # (d, hd)
        wv_h = wv[kv * head_dim : (kv + 1) * head_dim]  # (hd, d)
        mapped += wv_h.T @ (wo_h.T @ vv)  # (d, hd) @ ((hd, d) @ (d,)) -> (d,)
    u = gain.float() * mapped
    norm = u.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise PlanError("the attention-aware direction is zero or not finite")
    return u / norm


def norm_weighted(v: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Rows spanning {g ⊙ v_i}, orthonormal (m, d), for a writer followed by a norm with gain g.

    The norm's output is g ⊙ y / rms(y), so v_i . out = (g ⊙ v_i) . y / rms(y): projecting the
    writer's output y off span{g ⊙ v_i} removes every v_i from what reaches the residual,
    exactly, whatever rms(y) is.
    """
    weighted = gain.to(torch.float64)[None, :] * v.to(torch.float64)
    q = torch.linalg.qr(weighted.T).Q  # (d, m), orthonormal columns
    return q.T.to(torch.float32).contiguous()


def orthonormal(v, where: str):
    """Rows spanning the same space as ``v`` (m, d), orthonormal in float32, each oriented
    as the row it came from."""
    v64 = v.to(torch.float64).reshape(-1, v.shape[-1])
    if not torch.isfinite(v64).all() or (v64.norm(dim=1) < 1e-8).any():
        raise DirectionError(f"{where}: a direction vector is zero or not finite")
    if torch.linalg.matrix_rank(v64) < v64.shape[0]:
        raise DirectionError(f"{where}: the direction's rows are linearly dependent")
    q = torch.linalg.qr(v64.T).Q.T  # (m, d)
    signs = torch.sign((q * v64).sum(dim=1))  # QR may flip a row: keep each one's orientation
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    return q.to(torch.float32).contiguous()
