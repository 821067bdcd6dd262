"""The multi-route scan with its routes fused into the Triton scan kernels (GPU fast path).

Step t of route group k reads and writes position ``idx[k, t]`` of raster-ordered,
channels-last tensors (``harness/ops/scan_triton_step.py``), so the permuted copies of
``harness.ops.route_scan``'s materialised path and their inverses never exist. The per-head
projections are two dense matrix products with block-diagonal weights on channels-last
activations (cached between calls without gradients), so nothing around the scan is transposed
or copied. The scan itself is a custom operator (opaque to torch.compile, so a compiled model
keeps the kernels and takes no graph break; the route index is looked up inside, from the route
names and the grid size), with a registered autograd formula.

Call it through ``harness.ops.route_scan.multi_route_scan`` (mode ``"fused"`` or ``"auto"``).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from harness.ops import scan_triton_launch as launch
from harness.ops.routes import route_index
from harness.ops.selective_scan import resolve_backend

Tensor = torch.Tensor


def _route_steps(routes: str, height: int, width: int, device) -> Tensor:
    """(K, H·W) int32: step t of head k reads/writes flat position [k, t] (the one route-index cache)."""
    return route_index(tuple(routes.split(",")), height, width, device).steps


def _route_scan_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                     routes: str, height: int, width: int, accumulate: bool) -> Tensor:
    """y of the routed scan, returned channels-last: (b, L, U_CH). Inputs may have any strides."""
    idx = _route_steps(routes, height, width, u.device)
    b, U, L = u.shape
    if launch.forward_kernel_in_use() == "step":
        out = torch.empty(b, L, U, device=u.device, dtype=u.dtype)
        launch.forward_step(u, delta, A, B, C, D, delta_bias, True, idx=idx, accumulate=accumulate,
                            out=out.transpose(1, 2))
        return out
    y = launch.forward_tile(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), D, delta_bias, True,
                            idx=idx, accumulate=accumulate)
    return y.transpose(1, 2).contiguous()


# With the tile backward kernels (setting backward_kernel="tile", or groups that do not fit the
# step kernels' channel blocks), reading through a route index fetches one 32-byte sector per step
# and channel, about twice as slow as the same kernels on route-ordered copies: that backward
# gathers its inputs into route order, runs unrouted, and scatters the gradients back.


def _route_scan_bwd_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                         dy: Tensor, routes: str, height: int, width: int, accumulate: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``_route_scan_impl`` (dy is (b, L, U_CH))."""
    idx = _route_steps(routes, height, width, u.device)
    dy = dy.transpose(1, 2)  # (b, U_CH, L)
    if launch.use_step_backward(A, B):
        # reads and writes through the route index on channels-last runs, like the forward
        return launch.backward_step(u, delta, A, B, C, D, delta_bias, True, dy, idx=idx, accumulate=accumulate)
    return _step_layout(*_route_scan_bwd_tile(u, delta, A, B, C, D, delta_bias, dy, idx, accumulate))


def _step_layout(du, ddelta, dA, dB, dC, dD, dbias):
    """The gradients in the memory layout the step backward returns (and the fake declares):
    du, ddelta as (b, L, c) memory; dB, dC as (b, L, g, n) memory."""
    return (launch.seq_channels_last(du), launch.seq_channels_last(ddelta), dA, launch.bc_channels_last(dB),
            launch.bc_channels_last(dC), dD, dbias)


def _route_scan_bwd_tile(u, delta, A, B, C, D, delta_bias, dy, idx, accumulate):
    """The fused scan's gradients with the tile backward kernels, on route-ordered copies."""
    b, U, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    steps = idx.long()  # (G, L): step t of group g is position steps[g, t]
    chan_steps = steps.repeat_interleave(NCH // G, dim=0)  # (NCH, L), per scan channel
    src = torch.arange(NCH, device=u.device) % U  # u / y channel read by each scan channel

    def to_route(t):  # (b, U, L) raster -> (b, NCH, L) in each scan channel's route order
        return t[:, src].gather(-1, chan_steps.expand(b, NCH, L))

    def bc_to_route(t):  # (b, G, N, L)
        return t.gather(-1, steps[None, :, None, :].expand(b, G, N, L))

    du_r, ddelta_r, dA, dB_r, dC_r, dD, dbias = launch.backward_tile(
        to_route(u), delta.gather(-1, chan_steps.expand(b, NCH, L)), A, bc_to_route(B), bc_to_route(C), D,
        delta_bias, True, to_route(dy))
    du = torch.zeros(b, U, L, device=u.device, dtype=du_r.dtype)
    # scatter back to raster order; with the add merge the K heads' gradients sum into one u channel
    du.index_add_(1, src, torch.empty_like(du_r).scatter_(-1, chan_steps.expand(b, NCH, L), du_r))
    ddelta = torch.empty_like(ddelta_r).scatter_(-1, chan_steps.expand(b, NCH, L), ddelta_r)
    order = steps[None, :, None, :].expand(b, G, N, L)
    dB = torch.empty_like(dB_r).scatter_(-1, order, dB_r)
    dC = torch.empty_like(dC_r).scatter_(-1, order, dC_r)
    return du, ddelta, dA, dB, dC, dD, dbias


# A custom operator (opaque to torch.compile, so a compiled model keeps the kernels and takes no
# graph break; the route index is looked up inside, from the route names and the grid size).
_route_scan = torch.library.custom_op("eabench::route_scan", mutates_args=())(_route_scan_impl)
_route_scan_bwd = torch.library.custom_op("eabench::route_scan_bwd", mutates_args=())(_route_scan_bwd_impl)


@_route_scan.register_fake
def _(u, delta, A, B, C, D, delta_bias, routes, height, width, accumulate):
    return u.new_empty((u.shape[0], u.shape[2], u.shape[1]))


@_route_scan_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, dy, routes, height, width, accumulate):
    b, U, L = u.shape
    G, N = B.shape[1:3]
    return (u.new_empty((b, L, U)).transpose(1, 2), delta.new_empty((b, L, delta.shape[1])).transpose(1, 2),
            A.new_empty(A.shape), B.new_empty((b, L, G, N)).permute(0, 2, 3, 1),
            C.new_empty((b, L, G, N)).permute(0, 2, 3, 1), D.new_empty(D.shape), delta_bias.new_empty(delta_bias.shape))


def _route_scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, routes, height, width, accumulate = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.route = (routes, height, width, accumulate)


def _route_scan_backward(ctx, dy):
    grads = _route_scan_bwd(*ctx.saved_tensors, dy, *ctx.route)
    return (*grads, None, None, None, None)


_route_scan.register_autograd(_route_scan_backward, setup_context=_route_scan_setup)


# x_proj weight -> (its version, dt weight (weak), its version, merge, w_x, w_dt). Keyed by the
# tensor's identity (an entry dies with its tensor), so a new tensor that reuses a freed one's
# memory can never hit a stale entry.
_WEIGHT_CACHE = WeakIdKeyDictionary()


def _projection_weights(x_proj_weight, dt_projs_weight, merge: str, R: int, N: int):
    """The per-head projections as two dense matrices for channels-last activations.

    w_x (channels in, K·(R + 2N)): head k's W_k^T on its own input channels (concat: a
    block-diagonal matrix; add: every head reads all channels), columns grouped by part so
    that every head's Δ input comes first, then every B, then every C. w_dt (K·R, K·d): the
    block-diagonal dt projection. Without gradients (inference), cached until either weight
    changes in place.
    """
    versions = None
    needs_grad = torch.is_grad_enabled() and (x_proj_weight.requires_grad or dt_projs_weight.requires_grad)
    if not needs_grad and not torch.compiler.is_compiling():  # (a compiled graph builds them once anyway)
        try:
            versions = (x_proj_weight._version, dt_projs_weight._version)
        except RuntimeError:  # inference-mode tensors keep no version counter
            versions = None
        hit = _WEIGHT_CACHE.get(x_proj_weight) if versions is not None else None
        if hit is not None:
            x_version, dt_ref, dt_version, hit_merge, w_x, w_dt = hit
            if dt_ref() is dt_projs_weight and (x_version, dt_version, hit_merge) == (*versions, merge):
                return w_x, w_dt
    if versions is None:
        return _dense_projections(x_proj_weight, dt_projs_weight, merge, R, N)
    # built outside inference mode, so a later call that differentiates through them can save them
    with torch.inference_mode(False), torch.no_grad():
        w_x, w_dt = _dense_projections(x_proj_weight, dt_projs_weight, merge, R, N)
    _WEIGHT_CACHE[x_proj_weight] = (versions[0], weakref.ref(dt_projs_weight), versions[1], merge, w_x, w_dt)
    return w_x, w_dt


def _dense_projections(x_proj_weight, dt_projs_weight, merge: str, R: int, N: int):
    """w_x and w_dt of ``_projection_weights``, built from the weights."""
    K, c, d = x_proj_weight.shape
    heads = torch.arange(K, device=x_proj_weight.device)
    if merge == "concat":
        per_head = x_proj_weight.new_zeros(K, d, K, c)  # [k, :, k, :] = W_k^T, zero elsewhere
        per_head[heads, :, heads, :] = x_proj_weight.transpose(1, 2)
        per_head = per_head.reshape(K * d, K, c)
    else:
        per_head = x_proj_weight.permute(2, 0, 1)  # (D, K, c)
    w_x = torch.cat([per_head[..., :R].flatten(1), per_head[..., R:R + N].flatten(1),
                     per_head[..., R + N:].flatten(1)], dim=1)
    Kd = dt_projs_weight.shape[1]
    w_dt = dt_projs_weight.new_zeros(K, R, K, Kd)  # [k, :, k, :] = dt_k^T
    w_dt[heads, :, heads, :] = dt_projs_weight.transpose(1, 2)
    return w_x, w_dt.view(K * R, K * Kd)


def fused_multi_route_scan(x, head_routes, merge, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds
                           ) -> torch.Tensor:
    """``harness.ops.route_scan.multi_route_scan`` with the routes fused into the scan kernels.

    Everything stays channels-last ((B, L, channels) in memory; x is read without a copy when it
    is a channels_last map): the per-head projections are two dense matrix products with
    block-diagonal weights (one GEMM each instead of K small ones and their transposes; they
    act position by position, so they commute with the permutations), and the scan reads x, Δ,
    B, C and writes y through each head's route index. Returns (B, D, H·W) in x's dtype, a
    transposed view of channels-last memory, differentiable in every input.
    """
    b, D, h, w = x.shape
    L = h * w
    K, c, d = x_proj_weight.shape
    R = dt_projs_weight.shape[-1]
    N = A_logs.shape[-1]
    if merge not in ("concat", "add"):
        raise ValueError(f"unknown merge {merge!r}; valid merges: ['concat', 'add']")
    if len(head_routes) != K:
        raise ValueError(f"{len(head_routes)} head routes for {K} heads")
    if any("," in r for r in head_routes):
        raise ValueError(f"route names cannot contain ',': {head_routes}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_cl = x.permute(0, 2, 3, 1).reshape(b, L, D)  # (B, L, D)
    w_x, w_dt = _projection_weights(x_proj_weight, dt_projs_weight, merge, R, N)
    x_dbl = x_cl @ w_x  # (B, L, K·R + K·N + K·N): all heads' Δ inputs, then all B, then all C
    # one split (its backward is one concatenation, where three slices would each fill a
    # zero (B, L, ·) gradient and add them up)
    dt_in, B_flat, C_flat = torch.split(x_dbl, [K * R, K * N, K * N], dim=-1)
    dts = dt_in @ w_dt  # (B, L, K·d); a strided operand, no copy
    Bs = B_flat.view(b, L, K, N).permute(0, 2, 3, 1)  # (B, K, N, L), unit stride along N
    Cs = C_flat.view(b, L, K, N).permute(0, 2, 3, 1)
    y = _route_scan(
        x_cl.transpose(1, 2).to(work), dts.transpose(1, 2).to(work), (-torch.exp(A_logs.to(work))).contiguous(),
        Bs.to(work), Cs.to(work), Ds.to(work).contiguous(), dt_projs_bias.reshape(-1).to(work).contiguous(),
        ",".join(head_routes), h, w, merge == "add",
    )  # (B, L, D)
    return y.to(x.dtype).transpose(1, 2)


def can_fuse(x: torch.Tensor, backend: str = "auto") -> bool:
    """True when the routes of a scan of ``x`` can be fused: a (B, D, H, W) map whose scan
    backend resolves to triton (with the tile forward kernel, at most ``fuse_max_positions``)."""
    if x.dim() != 4:
        return False
    if (launch.forward_kernel_in_use() != "step"
            and x.shape[-1] * x.shape[-2] > launch.current_settings().fuse_max_positions):
        return False
    try:
        return resolve_backend(backend, x.device) == "triton"
    except (ValueError, RuntimeError):
        return False
