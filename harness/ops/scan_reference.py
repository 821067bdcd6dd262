"""Plain sequential selective scan: the definition every fast backend is tested against.

Differentiable through ordinary autograd and dtype-generic (use float64 for references).
Too slow for real sizes: one Python step per position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """y_t = C_t · x_t + D u_t with x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t, per channel.

    u, delta: (b, d, L); A: (d, n); B, C: (b, g, n, L), channel c in group c // (d // g);
    D, delta_bias: (d,). Returns y: (b, d, L). No z gate (the dispatcher applies it).
    """
    b, d, L = u.shape
    g, n = B.shape[1], B.shape[2]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # Expand the group's B, C to its channels: (b, g, n, L) -> (b, d, n, L)
    B = B.repeat_interleave(d // g, dim=1)
    C = C.repeat_interleave(d // g, dim=1)
    x = u.new_zeros(b, d, n)
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]  # (b, d, 1)
        x = torch.exp(dt * A) * x + dt * B[..., t] * u[:, :, t, None]
        ys.append((x * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)  # (b, d, L)
    if D is not None:
        y = y + D[:, None] * u
    return y
