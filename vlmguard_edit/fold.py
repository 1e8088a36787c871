"""Pure tensor math of the edit: M = I + beta * V^T V applied to residual writers.

Tensors in, tensors out. The math is done in float32, the result is cast back to the input
dtype once, and non-finite results are refused. Nothing here knows about files or models.
"""

from __future__ import annotations

import torch

from .errors import PlanError


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


def map_hidden(h: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """Apply (I + beta V^T V) to the last dim of activations h (..., d); used by runtime hooks."""
    h32 = h.to(torch.float32)
    v32 = v.to(device=h.device, dtype=torch.float32)
    out = h32 + beta * ((h32 @ v32.T) @ v32)  # (..., d) @ (d, m) -> (..., m) @ (m, d) -> (..., d)
    return out.to(h.dtype)
