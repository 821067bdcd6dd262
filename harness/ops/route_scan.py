"""The multi-route selective scan: one feature map scanned along one route per head.

``multi_route_scan`` is the one entry every caller uses (EAMamba's MHSSM, MambaIR's SS2D, the
benchmarks). Two implementations compute it:

- ``materialised``: the definition, as the releases run it: each head's permuted copy of its
  channels is gathered (``harness/ops/routes.py`` gives the permutations), projected to Δ, B
  and C, scanned by ``harness.ops.selective_scan`` on any backend, and gathered back into
  raster order;
- ``fused``: the routes fused into the Triton scan kernels on channels-last activations, no
  permuted copies (``harness/ops/route_scan_fused.py``; GPU, or CPU under the Triton interpreter).

``use_route_mode(mode)`` picks one inside a block: ``auto`` (the default: fused where the scan
backend resolves to ``triton``, else materialised), ``materialised`` or ``fused``. Every
parameter keeps its own dtype up to the scan, which computes in float64 when x is float64 and in
float32 otherwise, so a float64 model is an exact oracle of a float32 one.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from harness.ops.routes import route_indices
from harness.ops.selective_scan import selective_scan

try:  # the fused path needs Triton (its kernels are defined only where Triton imports)
    from harness.ops import route_scan_fused as _fused
except Exception:  # noqa: BLE001 - an optional GPU path must never break CPU-only imports
    _fused = None

MERGES = ("concat", "add")
ROUTE_MODES = ("auto", "materialised", "fused")
_state = threading.local()


@contextlib.contextmanager
def use_route_mode(mode: str):
    """Make ``multi_route_scan`` run ``mode`` ("auto", "materialised" or "fused") inside the block."""
    if mode not in ROUTE_MODES:
        raise ValueError(f"unknown route mode {mode!r}; valid modes: {list(ROUTE_MODES)}")
    previous = route_mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous


def route_mode() -> str:
    """The route mode in force ("auto" unless ``use_route_mode`` says otherwise)."""
    return getattr(_state, "mode", "auto")


def can_fuse(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether the fused path can scan ``x``: a (B, D, H, W) map whose ``backend`` resolves to triton."""
    return _fused is not None and _fused.can_fuse(x, backend)


def uses_fused_path(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether ``multi_route_scan(x, ..., backend)`` runs the fused path in the current route mode
    (callers that lay out their activations for it ask this once per forward)."""
    mode = route_mode()
    if mode == "materialised":
        return False
    if mode == "fused":
        if not can_fuse(x, "triton"):
            raise RuntimeError("route mode 'fused' needs the triton scan backend on this tensor's device "
                               f"({x.device.type}); usable here: materialised")
        return True
    return can_fuse(x, backend)


def multi_route_scan(
    x: torch.Tensor,
    head_routes: tuple[str, ...],
    merge: str,
    x_proj_weight: torch.Tensor,
    dt_projs_weight: torch.Tensor,
    dt_projs_bias: torch.Tensor,
    A_logs: torch.Tensor,
    Ds: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan of a (B, D, H, W) map along one route per head; returns (B, D, H·W).

    concat: head g scans channels [g·D/K, (g+1)·D/K) along ``head_routes[g]``;
    add: every head scans all D channels along its route, and the K outputs are summed.
    Projection shapes: x_proj_weight (K, R + 2N, d), dt_projs_weight (K, d, R),
    dt_projs_bias (K, d), A_logs (K·d, N), Ds (K·d), with d = D/K (concat) or D (add).
    """
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; valid merges: {list(MERGES)}")
    args = (x, tuple(head_routes), merge, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if uses_fused_path(x, backend):
        return _fused.fused_multi_route_scan(*args)
    return materialised_multi_route_scan(*args, backend=backend)


def materialised_multi_route_scan(x, head_routes, merge, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                  backend: str = "auto") -> torch.Tensor:
    """``multi_route_scan`` with every head's permuted copy materialised (the definition)."""
    b, D, h, w = x.shape
    L = h * w
    K, _, d = x_proj_weight.shape
    R = dt_projs_weight.shape[-1]
    N = A_logs.shape[-1]
    perm, inverse = route_indices(tuple(head_routes), h, w, x.device)  # (K, L) each
    flat = x.reshape(b, D, L)
    heads_in = flat.view(b, K, d, L) if merge == "concat" else flat.unsqueeze(1).expand(b, K, D, L)
    xs = heads_in.gather(-1, perm[None, :, None, :].expand(b, K, d, L))  # (B, K, d, L) in route order
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)  # (B, K, R + 2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)  # (B, K, d, L)
    ys = selective_scan(
        xs.reshape(b, K * d, L),
        dts.reshape(b, K * d, L),
        -torch.exp(A_logs),
        Bs,  # (B, K, N, L): one B per head, shared by its d channels
        Cs,
        D=Ds,
        delta_bias=dt_projs_bias.reshape(-1),
        delta_softplus=True,
        backend=backend,
    ).view(b, K, d, L)
    ys = ys.gather(-1, inverse[None, :, None, :].expand(b, K, d, L))  # back to raster order
    if merge == "concat":
        return ys.reshape(b, D, L)
    return ys.sum(1)
