"""EAMamba on one GPU, in one run: the fast paths against our torch backend and a released-style path.

    python -m harness.bench.gpu_eamamba --out OUT [--sizes 128 256 512 1024 2048]
        [--train 8x128 2x256 1x384] [--torch-train 8x128] [--compile [--compile-dynamic]]
        [--deadline-s 480] [--point-limit-s 20] [--no-checks] [--no-kernel] [--no-sweep]
        [--profile-path fast_eager]

Paths (one model, one set of random weights; fp32 unless the name says otherwise):
- ``fast``: triton scan backend with its default forward kernel (the step kernel), routes fused
  into the kernels on channels-last activations at every size, + the whole forward captured as
  one CUDA graph (inference) / the whole training step, AdamW included, captured (training);
- ``fast_eager``: the same without the graph; ``fast_cl``: ``fast`` with the model and input in
  the channels_last memory format;
- ``fast_default``: ``fast`` at PyTorch's default precision (TF32 in cuDNN convolutions, not in
  matrix products: how the release's timings were taken); ``release_default``: its reference;
- ``fast_tf32``: TF32 convolutions and matrix products; ``fast_bf16``: bf16 autocast (the scan
  itself stays fp32);
- ``tile_fused``: the tile forward kernel, routes fused up to 2¹⁷ positions (the first version);
- ``triton_unfused``: triton scan, permutations materialised;
- ``release``: the released structure: permuted copies materialised (gather in, gather back) and
  a plain per-channel scan (one program per channel walking the whole sequence, no segments:
  what mamba_ssm's kernel does at batch 1), in Triton;
- ``torch``: our chunked ``torch`` backend (the GPU correctness oracle);
- ``fast_compiled`` (with ``--compile``): ``fast`` with the model under
  ``torch.compile`` (``--compile-dynamic``: one compilation for every size; otherwise one per
  size; the fused scan is a custom operator, so the graph has no break), then captured as a
  CUDA graph.
TF32 is off everywhere except the ``*_default`` and ``fast_tf32`` paths. Output differences are
taken against the torch/release path of the same precision.

Phases, each written to OUT as soon as it ends (a run cut short still leaves its tables):
1. checks: the triton scan (forward and every gradient) against the torch backend in float64,
   the fused multi-route scan against ``multi_route_scan`` in float64, the whole model's
   output and parameter gradients against a float64 torch-backend model;
2. scan kernel: time and achieved bandwidth at the model's scan shapes (vs 4.8 TB/s datasheet,
   and vs a measured device copy);
3. inference: batch 1 at each size, ms (median), peak memory (the model's weights plus the most
   the point allocated during warm-up, capture and timed calls: what a fresh process would
   see), max relative difference to the torch backend's output (or to the release path's where
   the torch path is too slow);
4. training: forward + backward + AdamW step, L1 loss, per (batch, size);
5. a small sweep of the kernels' tile and segment settings (informative).
Points that run out of memory or would take too long are recorded, not fatal.
Outputs: gpu_eamamba.md (all tables), inference.csv, training.csv, scan_kernel.csv, checks.csv,
plots.png (latency and peak memory vs size, training step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import harness.models as hm
from harness.models import eamamba as eam
from harness.models.routes import ROUTE_SETS, route_indices
from harness.ops import ScanBackend, register_backend, selective_scan, use_backend
from harness.ops import scan_triton as st

DATASHEET_TBPS = 4.8
CHECK_TOL_MODEL = 1e-4

# --- route handling per path -----------------------------------------------------------------

_ORIGINAL_MRS = eam.multi_route_scan
_ROUTE_MODE = {"mode": "model"}


def materialised_multi_route_scan(x, head_routes, merge, x_proj_weight, dt_projs_weight, dt_projs_bias,
                                  A_logs, Ds, backend="auto"):
    """The released structure: every route's copy of x is materialised, scanned, and put back."""
    b, D, h, w = x.shape
    L = h * w
    K, _, d = x_proj_weight.shape
    R, N = dt_projs_weight.shape[-1], A_logs.shape[-1]
    perm, inverse = route_indices(tuple(head_routes), h, w, x.device)
    flat = x.reshape(b, D, L)
    src = flat.view(b, K, d, L) if merge == "concat" else flat.unsqueeze(1).expand(b, K, D, L)
    xs = torch.gather(src, -1, perm[None, :, None, :].expand(b, K, d, L)).contiguous()
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)
    ys = selective_scan(xs.view(b, K * d, L), dts.reshape(b, K * d, L), -torch.exp(A_logs.float()),
                        Bs.contiguous(), Cs.contiguous(), D=Ds.float(),
                        delta_bias=dt_projs_bias.reshape(-1).float(), delta_softplus=True,
                        backend=backend).view(b, K, d, L)
    ys = torch.gather(ys, -1, inverse[None, :, None, :].expand(b, K, d, L))
    return ys.reshape(b, D, L) if merge == "concat" else ys.sum(1)


def _dispatch(x, head_routes, merge, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, backend="auto"):
    mode = _ROUTE_MODE["mode"]
    args = (x, head_routes, merge, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if mode == "auto":  # the dispatch proposed for multi_route_scan: fuse small maps only
        mode = "fused" if st.can_fuse(x, backend) else "materialised"
    if mode == "fused":
        return st.fused_multi_route_scan(*args)
    if mode == "materialised":
        return materialised_multi_route_scan(*args, backend)
    return _ORIGINAL_MRS(*args, backend)


eam.multi_route_scan = _dispatch  # MHSSM.forward looks the name up in its module


def _release_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    # one program per channel over the whole sequence, no segments (mamba_ssm at batch 1). The
    # tile kernel with one channel per program: on the H200 a one-step-at-a-time kernel in this
    # role (session 1's, 8 channels per warp) was 15x slower (17.9 vs 1.2 ms at d 64, 256²),
    # which would flatter the fast paths.
    return st._forward_tile(u, delta, A, B, C, D, delta_bias, delta_softplus, block_d=1, seg_tiles=1 << 30)


def _release_bwd(u, delta, A, B, C, D, delta_bias, delta_softplus, dy):
    return st._backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy.contiguous(), block_d=1,
                        seg_tiles=1 << 30)


register_backend(ScanBackend("release_scan", _release_fwd, _release_bwd, st.is_available, st.supports))

class PathSpec(NamedTuple):
    """How one benchmark path runs the model. precision: "strict" (no TF32 anywhere), "default"
    (PyTorch's defaults: TF32 in cuDNN convolutions, not in matrix products), "tf32" (both).
    kernel / fuse_max: the forward kernel and largest fused map (None: the module's defaults)."""

    backend: str
    route_mode: str
    graph: bool
    precision: str
    bf16: bool
    kernel: str | None
    fuse_max: int | None
    channels_last: bool
    cudnn_benchmark: bool = False  # let cuDNN time its algorithms per shape (exact in strict fp32 too)


PATHS = {
    # name: PathSpec(scan backend, route mode, graph, precision, bf16, forward kernel, largest
    #       fused map, channels_last model and input)
    "fast": PathSpec("triton", "auto", True, "strict", False, None, None, False),
    "fast_eager": PathSpec("triton", "auto", False, "strict", False, None, None, False),
    "fast_cl": PathSpec("triton", "auto", True, "strict", False, None, None, True),
    "fast_bench": PathSpec("triton", "auto", True, "strict", False, None, None, False, True),  # run 9: = fast
    "fast_default": PathSpec("triton", "auto", True, "default", False, None, None, False),
    "fast_tf32": PathSpec("triton", "auto", True, "tf32", False, None, None, False),
    "fast_bf16": PathSpec("triton", "auto", True, "strict", True, None, None, False),
    "tile_fused": PathSpec("triton", "auto", True, "strict", False, "tile", 1 << 17, False),
    "triton_unfused": PathSpec("triton", "materialised", False, "strict", False, None, None, False),
    "release": PathSpec("release_scan", "materialised", False, "strict", False, "tile", None, False),
    "release_default": PathSpec("release_scan", "materialised", False, "default", False, "tile", None, False),
    "torch": PathSpec("torch", "model", False, "strict", False, None, None, False),
    "fast_compiled": PathSpec("triton", "auto", True, "strict", False, None, None, False),  # + torch.compile
}
TRAIN_PATHS = ["fast", "fast_eager", "fast_default", "tile_fused", "release", "release_default", "torch"]
PRECISIONS = {"strict": (False, False), "default": (False, True), "tf32": (True, True)}  # (matmul, cudnn)


def memory_format(path: str):
    return torch.channels_last if PATHS[path].channels_last else torch.contiguous_format


@contextlib.contextmanager
def path_settings(name: str):
    spec = PATHS[name]
    old = (_ROUTE_MODE["mode"], torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           st.FORWARD_KERNEL, st.BACKWARD_KERNEL, st.FUSE_MAX_POSITIONS, torch.backends.cudnn.benchmark)
    _ROUTE_MODE["mode"] = spec.route_mode
    torch.backends.cudnn.benchmark = spec.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = PRECISIONS[spec.precision]
    st.FORWARD_KERNEL = spec.kernel or st.FORWARD_KERNEL
    st.BACKWARD_KERNEL = spec.kernel or st.BACKWARD_KERNEL
    st.FUSE_MAX_POSITIONS = spec.fuse_max or st.FUSE_MAX_POSITIONS
    try:
        with use_backend(spec.backend):
            yield
    finally:
        (_ROUTE_MODE["mode"], torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         st.FORWARD_KERNEL, st.BACKWARD_KERNEL, st.FUSE_MAX_POSITIONS, torch.backends.cudnn.benchmark) = old


def autocast_ctx(name: str, device):
    if PATHS[name].bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


# --- timing and memory ------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, min_reps=3, max_reps=25, target_s=1.0) -> tuple[float, int]:
    """Median ms of fn() (already warm), with CUDA events on a GPU."""
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < target_s):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def allocated_mb(device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def model_mb(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def point_peak_mb(device, base_mb: float, model: torch.nn.Module) -> float:
    """Peak allocated memory of one point as a fresh process would see it: the model's weights
    plus the most the point allocated on top of what was resident when it started (other
    paths' cached tensors, references, inputs), so figures do not depend on the run's order."""
    return peak_mb(device) - base_mb + model_mb(model)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def max_rel(pairs) -> float:
    return max(rel(a, b) for a, b in pairs)


def fail_text(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# --- phase 1: checks -------------------------------------------------------------------------

def scan_case(b, d, L, n, g, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    A = -torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1) * (0.5 + torch.rand(d, 1, generator=gen,
                                                                                       dtype=torch.float64))
    inp = dict(u=r(b, d, L), delta=r(b, d, L) * 0.5 - 3.0, A=A, B=r(b, g, n, L), C=r(b, g, n, L), D=r(d),
               z=r(b, d, L), delta_bias=r(d) * 0.3)
    return {k: v.to(device) for k, v in inp.items()}


def check_scan(shape, device) -> dict:
    """Triton (fp32) vs torch backend (float64): y and every gradient, via the dispatcher."""
    inp = scan_case(*shape, device=device, seed=sum(shape))
    out = {}
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        leaves = {k: v.detach().to(dtype).clone().requires_grad_() for k, v in inp.items()}
        y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                           z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True, backend=backend)
        gen = torch.Generator(device="cpu").manual_seed(1)
        y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
        out[backend] = {"y": y.detach(), **{"d" + k: v.grad for k, v in leaves.items()}}
    return {k: rel(out["triton"][k], out["torch"][k]) for k in out["torch"]}


def check_fused(routes, merge, heads, dim, h, w, device, b=2, d_state=16, dt_rank=4) -> dict:
    torch.manual_seed(heads + dim + h)
    names = ROUTE_SETS.get(routes, (routes,))
    head_routes = tuple(names[i % len(names)] for i in range(heads))
    d = dim if merge == "add" else dim // heads
    params = eam.init_ssm_parameters(heads, d, dt_rank, d_state)
    params["Ds"] = torch.randn(heads * d)
    order = ["x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]
    x = torch.randn(b, dim, h, w)
    res = {}
    for kind, dtype in (("torch", torch.float64), ("fused", torch.float32)):
        xx = x.to(device=device, dtype=dtype).requires_grad_()
        ps = [params[k].to(device=device, dtype=dtype).requires_grad_() for k in order]
        if kind == "fused":
            y = st.fused_multi_route_scan(xx, head_routes, merge, *ps)
        else:
            y = _ORIGINAL_MRS(xx, head_routes, merge, *ps, "torch")
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        y.backward(gy.to(device=device, dtype=dtype))
        res[kind] = [y.detach(), xx.grad] + [p.grad for p in ps]
    labels = ["y", "dx"] + ["d" + k for k in order]
    return {lab: rel(a, c) for lab, a, c in zip(labels, res["fused"], res["torch"])}


def model_outputs_and_grads(model, x, target, path, device, dtype=torch.float32):
    m = copy.deepcopy(model).to(device=device, dtype=dtype).train().to(memory_format=memory_format(path))
    with path_settings(path):
        out = m(x.to(dtype).contiguous(memory_format=memory_format(path)))
        loss = F.l1_loss(out, target.to(dtype))
        loss.backward()
        with torch.no_grad():  # the inference-only paths (mm projections, cached weights)
            out_no_grad = m(x.to(dtype).contiguous(memory_format=memory_format(path)))
    grads = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    return out.detach(), grads, out_no_grad


def phase_checks(args, device, model, log) -> list[dict]:
    rows = []
    shapes = [(2, 4, 1, 4, 1), (1, 8, 37, 4, 8), (2, 16, 1009, 16, 8), (1, 64, 4093, 16, 8),
              (1, 64, 65536, 16, 8), (2, 128, 4096, 16, 8), (1, 512, 1024, 16, 8), (1, 24, 3001, 3, 3)]
    # (the first two: also in the CPU interpreter tests; every size is a run-time value, so the
    # model's (d_state 16, 8 channels per block) variant is shared by most of these)
    if device.type != "cuda":
        shapes = shapes[:2]
    fused_cases = [("all_around", "concat", 8, 64, 48, 40), ("cross", "add", 4, 16, 24, 20),
                   ("all_around", "concat", 16, 32, 17, 13)]
    if device.type != "cuda":
        fused_cases = [("all_around", "concat", 8, 16, 5, 7)]
    checks = [(f"scan ({{}} kernels) b{s[0]} d{s[1]} L{s[2]} n{s[3]} g{s[4]}", lambda s=s: check_scan(s, device))
              for s in shapes]
    checks += [(f"fused ({{}} kernels) {c[1]} {c[0]} heads{c[2]} D{c[3]} {c[4]}x{c[5]}",
                lambda c=c: check_fused(*c, device=device)) for c in fused_cases]
    saved_kernel = st.FORWARD_KERNEL, st.BACKWARD_KERNEL
    for kernel in ("tile", "step"):  # every check under each kernel family (forward and backward)
        for label, check in checks:
            st.FORWARD_KERNEL = st.BACKWARD_KERNEL = kernel
            row = dict(check=label.format(kernel), max_rel=float("nan"), tol=1e-5)
            try:
                errs = check()
                row.update(max_rel=max(errs.values()), detail=json.dumps({k: f"{v:.1e}" for k, v in errs.items()}))
            except Exception as e:  # noqa: BLE001
                row.update(detail=fail_text(e))
                traceback.print_exc()
            finally:
                st.FORWARD_KERNEL, st.BACKWARD_KERNEL = saved_kernel
            rows.append(row)
            log(row)
    # whole model: outputs and all parameter gradients vs a float64 torch-backend model
    size = 64 if device.type == "cuda" else 8
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, size, size, generator=gen).to(device)
    t = torch.rand(2, 3, size, size, generator=gen).to(device)
    try:
        ref_out, ref_g, _ = model_outputs_and_grads(model, x, t, "torch", device, torch.float64)
        for path in ["fast_eager", "release", "torch"]:
            out, g, out_ng = model_outputs_and_grads(model, x, t, path, device)
            errs = {"out": rel(out, ref_out), "grads": rel(g, ref_g), "out_no_grad": rel(out_ng, ref_out)}
            rows.append(dict(check=f"model 2x{size}^2 {path} (fp32) vs torch fp64", max_rel=max(errs.values()),
                             tol=CHECK_TOL_MODEL, detail=json.dumps({k: f"{v:.1e}" for k, v in errs.items()})))
            log(rows[-1])
    except Exception as e:  # noqa: BLE001
        rows.append(dict(check="model grads", max_rel=float("nan"), tol=CHECK_TOL_MODEL, detail=fail_text(e)))
        traceback.print_exc()
        log(rows[-1])
    return rows


# --- phase 2: the scan kernel ------------------------------------------------------------------

def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(2 * 2**30 // 4, device=device)
    b_ = torch.empty_like(a)
    b_.copy_(a)
    ms, _ = timed(lambda: b_.copy_(a), device, min_reps=5, max_reps=10, target_s=0.2)
    del a, b_
    return 2 * 2 * 2**30 / (ms * 1e-3) / 1e12


def phase_kernel(args, device, log) -> list[dict]:
    rows = []
    g, n = 8, 16
    shapes = [(1, 64, 256), (1, 128, 256), (1, 512, 32), (1, 64, 1024), (8, 64, 128)]
    if device.type != "cuda":
        shapes = [(1, 8, 8)]
    for b, d, side in shapes:
        L = side * side
        inp = scan_case(b, d, L, n, g, device, seed=7)
        for k in inp:
            inp[k] = inp[k].float()
        u, dl, A, B, C, D, bias = (inp[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
        dy = inp["z"]
        idx = st.route_index(tuple(ROUTE_SETS["all_around"]), side, side, device)
        min_fwd = 4 * b * (3 * d * L + 2 * g * n * L)
        min_bwd = 4 * b * (5 * d * L + 4 * g * n * L)
        cfg = st._config(b, g, d // g, L, n, device, False)
        step_nseg = st._step_segments(b, d, L, device)[1]
        nseg_default = step_nseg if st.FORWARD_KERNEL == "step" else cfg["NSEG"]
        design_fwd = min_fwd + (4 * b * (2 * d * L + g * n * L) if nseg_default > 1 else 0)
        cl3, cl4 = st.seq_channels_last, st.bc_channels_last
        u_cl, dl_cl, B_cl, C_cl, dy_cl = cl3(u), cl3(dl), cl4(B), cl4(C), cl3(dy)
        out_cl = torch.empty(b, L, d, device=device).transpose(1, 2)
        variants = {
            "triton fwd": lambda: st._forward_tile(u, dl, A, B, C, D, bias, True),
            "triton fwd (step kernel)": lambda: st._forward_step(u, dl, A, B, C, D, bias, True),
            "step kernel, channels-last": lambda: st._forward_step(u_cl, dl_cl, A, B_cl, C_cl, D, bias, True,
                                                                   out=out_cl),
            "step kernel, channels-last, routed": lambda: st._forward_step(u_cl, dl_cl, A, B_cl, C_cl, D, bias, True,
                                                                           idx=idx, out=out_cl),
            "triton fwd, routed (all_around)": lambda: st._forward_tile(u, dl, A, B, C, D, bias, True, idx=idx),
            "triton bwd": lambda: st._backward_tile(u, dl, A, B, C, D, bias, True, dy),
            "triton bwd, routed": lambda: st._backward_tile(u, dl, A, B, C, D, bias, True, dy, idx=idx),
            "step bwd, channels-last, routed": lambda: st._backward_step(u_cl, dl_cl, A, B_cl, C_cl, D, bias, True,
                                                                        dy_cl, idx=idx),
            "per-channel fwd (release-style)": lambda: _release_fwd(u, dl, A, B, C, D, bias, True),
            "per-channel bwd (release-style)": lambda: _release_bwd(u, dl, A, B, C, D, bias, True, dy),
            "torch fwd": lambda: selective_scan(u, dl, A, B, C, D=D, delta_bias=bias, delta_softplus=True,
                                                backend="torch"),
        }
        for name, fn in variants.items():
            row = dict(shape=f"b{b} d{d} L{side}^2 n{n} g{g}", variant=name,
                       segments=1 if "per-channel" in name else (
                           step_nseg if "step" in name
                           else cfg["NSEG"] if "triton" in name else ""))
            if name == "torch fwd" and b * d * L > 64 * 65536 * 2:
                row.update(ms=float("nan"), note="skipped (slow)")
                rows.append(row)
                continue
            try:
                with torch.no_grad():
                    fn()
                    sync(device)
                    ms, reps = timed(fn, device, min_reps=3, max_reps=20, target_s=0.3)
                nbytes = min_bwd if "bwd" in name else min_fwd
                row.update(ms=ms, min_MB=nbytes / 1e6, TBps_min_bytes=nbytes / (ms * 1e-3) / 1e12,
                           pct_datasheet=100 * nbytes / (ms * 1e-3) / 1e12 / DATASHEET_TBPS)
                if name == "triton fwd":
                    row.update(design_MB=design_fwd / 1e6,
                               TBps_design_bytes=design_fwd / (ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001
                row.update(ms=float("nan"), note=fail_text(e))
                traceback.print_exc()
            rows.append(row)
            log(row)
        del inp, u, dl, A, B, C, D, bias, dy, u_cl, dl_cl, B_cl, C_cl, out_cl
        reset_peak(device)
    return rows


# --- phases 3 and 4: the model ------------------------------------------------------------------

def capture_inference(model, x, name, device):
    static_x = x.clone()
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s), torch.no_grad(), autocast_ctx(name, device):
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s), torch.no_grad(), autocast_ctx(name, device):
        static_y = model(static_x)
    graph.replay()
    return graph, static_y


INFERENCE_ORDER = ["torch", "release", "release_default", "triton_unfused", "tile_fused", "fast_eager", "fast", "fast_bench",
                   "fast_cl", "fast_default", "fast_tf32", "fast_bf16"]


def phase_inference(args, device, model, log, deadline, order, sizes, refs, models=None) -> list[dict]:
    """Time ``order``'s paths at each size; refs[size] = (path, output on CPU) for the diffs."""
    rows = []
    last_ms: dict[str, tuple[int, float]] = {}
    failed: set[str] = set()
    models = models or {}
    if device.type != "cuda":
        order = [p for p in order if not PATHS[p].graph]
    for size in sizes:
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
        for path in order:
            net = models.get(path, model)
            if PATHS[path].channels_last:
                net = copy.deepcopy(net).to(memory_format=torch.channels_last)
            xin = x.contiguous(memory_format=memory_format(path))
            row = dict(size=size, path=path)
            est = None
            if path in last_ms:
                s0, ms0 = last_ms[path]
                est = ms0 * (size / s0) ** 2 * (1.6 if path == "torch" else 1.1)
            if time.time() > deadline:
                row.update(ms=float("nan"), note="skipped (deadline)")
            elif path in failed:
                row.update(ms=float("nan"), note="skipped (failed at a smaller size)")
            elif est is not None and est > args.point_limit_s * 1e3 / 4:
                row.update(ms=float("nan"), note=f"skipped (est. {est / 1e3:.0f} s/forward)")
            else:
                try:
                    with path_settings(path):
                        reset_peak(device)
                        base_mb = allocated_mb(device)
                        t0 = time.perf_counter()
                        if PATHS[path].graph:
                            graph, static_y = capture_inference(net, xin, path, device)
                            fn = graph.replay
                        else:
                            def fn(x=xin, path=path, net=net):
                                with torch.no_grad(), autocast_ctx(path, device):
                                    return net(x)
                            static_y = fn()
                        sync(device)
                        first_s = time.perf_counter() - t0
                        mem = point_peak_mb(device, base_mb, net)
                        second_s = None
                        if first_s > args.point_limit_s / 2 and not PATHS[path].graph:
                            # the first call may include compilation: judge by a second one
                            t0 = time.perf_counter()
                            fn()
                            sync(device)
                            second_s = time.perf_counter() - t0
                        if second_s is not None and second_s > args.point_limit_s / 4:
                            ms, reps = second_s * 1e3, 1  # one slow forward is the measurement
                        else:
                            ms, reps = timed(fn, device, min_reps=3, max_reps=20, target_s=1.0)
                        y = static_y.float()
                        # the reference of a path: the first torch/release output at its size and
                        # precision (strict-fp32 references also serve the bf16 path)
                        key = size if PATHS[path].precision == "strict" else (size, PATHS[path].precision)
                        if key not in refs and path.startswith(("torch", "release")):
                            refs[key] = (path, y.cpu())
                        elif key in refs and refs[key][0] != path:
                            row["max_rel_diff"] = rel(y.cpu(), refs[key][1])
                            row["diff_vs"] = refs[key][0]
                        elif key != size and size in refs:  # TF32 paths without a same-precision reference
                            row["max_rel_diff"] = rel(y.cpu(), refs[size][1])
                            row["diff_vs"] = refs[size][0] + " (strict fp32)"
                        row.update(ms=ms, reps=reps, peak_MB=mem, first_call_s=first_s)
                        last_ms[path] = (size, ms)
                        if PATHS[path].graph:
                            del graph
                        del static_y, y
                except Exception as e:  # noqa: BLE001
                    row.update(ms=float("nan"), note=fail_text(e))
                    if not isinstance(e, torch.cuda.OutOfMemoryError):
                        traceback.print_exc()
                        failed.add(path)
                    last_ms[path] = (size, float("inf"))
            rows.append(row)
            log(row)
            reset_peak(device)
    return rows


def capture_train_step(model, opt, x, t, device):
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            F.l1_loss(model(x), t).backward()
            opt.step()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph, stream=s):
        loss = F.l1_loss(model(x), t)
        loss.backward()
        opt.step()
    graph.replay()
    return graph, loss


def train_estimate_ms(infer_ms: dict, path: str, bsz: int, size: int):
    """About 3 forwards per step, scaled by pixels from the nearest timed inference size."""
    ipath = "fast_eager" if path == "fast" else path
    timed_sizes = [s for (s, p), ms in infer_ms.items() if p == ipath and ms == ms]
    if not timed_sizes:
        return None
    s0 = min(timed_sizes, key=lambda s: abs(math.log(s / size)))
    return 3 * infer_ms[(s0, ipath)] * bsz * (size / s0) ** 2


def phase_training(args, device, base_model, log, deadline, inference_rows) -> list[dict]:
    rows = []
    infer_ms = {(r["size"], r["path"]): r.get("ms", float("nan")) for r in inference_rows}
    paths = [p for p in args.train_paths if device.type == "cuda" or not PATHS[p].graph]
    for spec in args.train:
        bsz, size = (int(v) for v in spec.lower().split("x"))
        gen = torch.Generator().manual_seed(bsz * size)
        x = torch.rand(bsz, 3, size, size, generator=gen).to(device)
        t = torch.rand(bsz, 3, size, size, generator=gen).to(device)
        for path in paths:
            row = dict(batch=bsz, size=size, path=path)
            est = train_estimate_ms(infer_ms, path, bsz, size)
            if path == "torch" and spec not in args.torch_train:
                row.update(ms=float("nan"), note="not run (torch path: see --torch-train)")
            elif time.time() > deadline:
                row.update(ms=float("nan"), note="skipped (deadline)")
            elif est is not None and est > args.point_limit_s * 1e3:
                row.update(ms=float("nan"), note=f"skipped (est. {est / 1e3:.0f} s/step)")
            else:
                try:
                    with path_settings(path):
                        model = copy.deepcopy(base_model).to(device).train().to(memory_format=memory_format(path))
                        x, t = x.contiguous(memory_format=memory_format(path)), t.contiguous(memory_format=memory_format(path))
                        graph_mode = PATHS[path].graph
                        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=graph_mode)
                        reset_peak(device)
                        base_mb = allocated_mb(device) - model_mb(model)
                        t0 = time.perf_counter()
                        if graph_mode:
                            graph, loss = capture_train_step(model, opt, x, t, device)
                            fn = graph.replay
                        else:
                            def fn(model=model, opt=opt):
                                opt.zero_grad(set_to_none=True)
                                loss = F.l1_loss(model(x), t)
                                loss.backward()
                                opt.step()
                                return loss
                            loss = fn()
                        sync(device)
                        first_s = time.perf_counter() - t0
                        if not graph_mode:
                            reset_peak(device)
                            fn()
                        mem = point_peak_mb(device, base_mb, model)
                        if first_s > args.point_limit_s / 2:
                            # the first call includes compilation and capture: judge by a second one
                            t0 = time.perf_counter()
                            fn()
                            sync(device)
                            second_s = time.perf_counter() - t0
                        if first_s > args.point_limit_s / 2 and second_s > args.point_limit_s / 4:
                            ms, reps = second_s * 1e3, 1
                        else:
                            ms, reps = timed(fn, device, min_reps=3, max_reps=15, target_s=1.5)
                        row.update(ms=ms, reps=reps, peak_MB=mem, images_per_s=bsz / (ms * 1e-3),
                                   loss=float(loss.detach()), first_call_s=first_s)
                        del model, opt, fn, loss
                        if graph_mode:
                            del graph
                except Exception as e:  # noqa: BLE001
                    row.update(ms=float("nan"), note=fail_text(e))
                    if not isinstance(e, torch.cuda.OutOfMemoryError):
                        traceback.print_exc()
            rows.append(row)
            log(row)
            reset_peak(device)
    return rows


# --- where the time goes --------------------------------------------------------------------------

def profile_top(fn, device, top=14) -> list[dict]:
    """GPU time per kernel name over one call of fn (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    agg: dict[str, list] = {}
    for ev in prof.events():
        if "CUDA" not in str(getattr(ev, "device_type", "")):
            continue
        entry = agg.setdefault(ev.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += ev.time_range.elapsed_us() / 1e3
    rows = [dict(kernel=k, calls=c, ms=t) for k, (c, t) in agg.items()]
    total = sum(r["ms"] for r in rows) or float("nan")
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["pct"] = 100 * r["ms"] / total
    head = rows[:top]
    head.append(dict(kernel=f"(all {len(rows)} kernels)", calls=sum(r["calls"] for r in rows), ms=total, pct=100.0))
    return head


def phase_profile(args, device, model, log) -> list[tuple[str, list[dict]]]:
    out = []
    if device.type != "cuda":
        return out
    path = args.profile_path
    fmt_ = memory_format(path)
    net = copy.deepcopy(model).to(memory_format=fmt_)
    for size in (256, 1024):
        try:
            x = torch.rand(1, 3, size, size, device=device).contiguous(memory_format=fmt_)
            with path_settings(path), torch.no_grad():
                net(x)
                out.append((f"inference {path} 1x{size}^2", profile_top(lambda: net(x), device)))
        except Exception as e:  # noqa: BLE001
            out.append((f"inference 1x{size}^2", [dict(kernel=fail_text(e))]))
    try:
        m = copy.deepcopy(net).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        x = torch.rand(8, 3, 128, 128, device=device).contiguous(memory_format=fmt_)

        def step():
            opt.zero_grad(set_to_none=True)
            F.l1_loss(m(x), x).backward()
            opt.step()

        with path_settings(path):
            step()
            out.append((f"training step {path} 8x128^2", profile_top(step, device)))
        del m, opt
    except Exception as e:  # noqa: BLE001
        out.append(("training 8x128^2", [dict(kernel=fail_text(e))]))
    for title, rows in out:
        log({"profile": title, "top": rows[:5]})
    return out


# --- phase 5: kernel settings sweep -------------------------------------------------------------

def _time_settings(settings, knobs, fns, row_base, device, log, deadline, rows, min_reps=3, max_reps=10):
    """For each dict of module-level ``scan_triton`` knobs: set it, time every fn in ``fns``
    (name -> callable, forward and backward kernels alike), restore the defaults."""
    default = {k: getattr(st, k) for k in knobs}
    for s in settings:
        if time.time() > deadline:
            break
        for k, v in s.items():
            setattr(st, k, v)
        row = dict(row_base(s))
        try:
            with torch.no_grad():
                for fn in fns.values():
                    fn()
                sync(device)
                for name, fn in fns.items():
                    row[name], _ = timed(fn, device, min_reps=min_reps, max_reps=max_reps, target_s=0.2)
        except Exception as e:  # noqa: BLE001
            row["note"] = fail_text(e)
        finally:
            for k, v in default.items():
                setattr(st, k, v)
        rows.append(row)
        log(row)


def sweep_step_kernel(device, log, deadline) -> list[dict]:
    """The step kernel's knobs on channels-last, routed inputs at the model's level-1 shapes."""
    rows: list[dict] = []
    knobs = ("STEP_UNROLL", "STEP_WARPS", "STEP_WARPS_PER_SM", "STEP_MIN_SEGMENT", "CARRY_BLOCK_S", "STEP_MAXNREG")
    # each iteration waits for one memory round trip (positions read an iteration ahead, loads
    # before stores): unroll trades steps in flight per warp against registers (warps per SM)
    settings = [{}, dict(STEP_UNROLL=1), dict(STEP_UNROLL=2), dict(STEP_UNROLL=8), dict(STEP_WARPS=2),
                dict(STEP_WARPS_PER_SM=64, STEP_MIN_SEGMENT=16), dict(STEP_WARPS_PER_SM=64, STEP_MIN_SEGMENT=64),
                dict(STEP_WARPS_PER_SM=16), dict(STEP_UNROLL=2, STEP_WARPS_PER_SM=64, STEP_MIN_SEGMENT=16),
                dict(STEP_UNROLL=1, STEP_WARPS_PER_SM=64, STEP_MIN_SEGMENT=16),
                dict(STEP_UNROLL=2, STEP_MAXNREG=128), dict(STEP_UNROLL=4, STEP_MAXNREG=168)]
    g, n = 8, 16
    for b, d, side in [(1, 64, 256), (1, 64, 1024), (8, 64, 128), (1, 512, 32)]:
        L = side * side
        inp = {k: v.float() for k, v in scan_case(b, d, L, n, g, device, seed=9).items()}
        u, dl, A, B, C, D, bias = (inp[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
        u, dl = st.seq_channels_last(u), st.seq_channels_last(dl)
        B, C = st.bc_channels_last(B), st.bc_channels_last(C)
        out = torch.empty(b, L, d, device=device).transpose(1, 2)
        idx = st.route_index(tuple(ROUTE_SETS["all_around"]), side, side, device)
        fns = {"fwd_routed_ms": lambda: st._forward_step(u, dl, A, B, C, D, bias, True, idx=idx, out=out)}
        _time_settings(settings, knobs, fns,
                       lambda s: dict(shape=f"b{b} d{d} L{side}^2", setting="step " + (json.dumps(s) if s else "default"),
                                      segments=st._step_segments(b, d, L, device)[1]),
                       device, log, deadline, rows, max_reps=20)
        del inp, u, dl, A, B, C, D, bias, out
        reset_peak(device)
    return rows


def sweep_step_backward(device, log, deadline) -> list[dict]:
    """The step backward's knobs (unroll, segments, register cap) on channels-last, routed inputs."""
    rows: list[dict] = []
    knobs = ("STEP_BWD_UNROLL", "STEP_WARPS_PER_SM", "STEP_MIN_SEGMENT", "STEP_MAXNREG")
    settings = [{}, dict(STEP_BWD_UNROLL=2), dict(STEP_WARPS_PER_SM=64),
                dict(STEP_WARPS_PER_SM=64, STEP_MIN_SEGMENT=16), dict(STEP_WARPS_PER_SM=16),
                dict(STEP_MAXNREG=168), dict(STEP_BWD_UNROLL=2, STEP_WARPS_PER_SM=64, STEP_MIN_SEGMENT=16)]
    g, n = 8, 16
    for b, d, side in [(8, 64, 128), (1, 64, 256), (8, 128, 64), (1, 512, 32)]:
        L = side * side
        inp = {k: v.float() for k, v in scan_case(b, d, L, n, g, device, seed=9).items()}
        u, dl, dy = (st.seq_channels_last(inp[k]) for k in ("u", "delta", "z"))
        B, C = st.bc_channels_last(inp["B"]), st.bc_channels_last(inp["C"])
        A, D, bias = inp["A"], inp["D"], inp["delta_bias"]
        idx = st.route_index(tuple(ROUTE_SETS["all_around"]), side, side, device)
        fns = {"bwd_routed_ms": lambda: st._backward_step(u, dl, A, B, C, D, bias, True, dy, idx=idx)}
        _time_settings(settings, knobs, fns,
                       lambda s: dict(shape=f"b{b} d{d} L{side}^2",
                                      setting="step bwd " + (json.dumps(s) if s else "default"),
                                      segments=st._step_segments(b, d, L, device)[1]),
                       device, log, deadline, rows, max_reps=20)
        del inp, u, dl, dy, A, B, C, D, bias
        reset_peak(device)
    return rows


def phase_sweep(args, device, log, deadline) -> list[dict]:
    rows = []
    if device.type != "cuda":
        return rows
    if "step_bwd" in args.sweeps:
        rows += sweep_step_backward(device, log, deadline)
    if "step_fwd" in args.sweeps:
        rows += sweep_step_kernel(device, log, deadline)
    if "tile" not in args.sweeps:
        return rows
    knobs = ("PROGRAMS_PER_SM", "FWD_TILE_ELEMENTS", "BWD_TILE_ELEMENTS", "MAX_BLOCK_D", "FWD_WARPS", "BWD_WARPS")
    settings = [{}, dict(PROGRAMS_PER_SM=2), dict(PROGRAMS_PER_SM=8), dict(FWD_TILE_ELEMENTS=2048),
                dict(FWD_TILE_ELEMENTS=8192, FWD_WARPS=8), dict(MAX_BLOCK_D=4), dict(BWD_TILE_ELEMENTS=4096, BWD_WARPS=8),
                dict(BWD_TILE_ELEMENTS=1024), dict(MAX_BLOCK_D=16, FWD_TILE_ELEMENTS=8192, FWD_WARPS=8)]
    g, n = 8, 16
    for b, d, side in [(1, 64, 256), (8, 64, 128)]:
        L = side * side
        inp = {k: v.float() for k, v in scan_case(b, d, L, n, g, device, seed=9).items()}
        u, dl, A, B, C, D, bias, dy = (inp[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias", "z"))
        idx = st.route_index(tuple(ROUTE_SETS["all_around"]), side, side, device)
        fns = {"fwd_routed_ms": lambda: st._forward_tile(u, dl, A, B, C, D, bias, True, idx=idx),
               "bwd_routed_ms": lambda: st._backward(u, dl, A, B, C, D, bias, True, dy, idx=idx)}
        _time_settings(settings, knobs, fns,
                       lambda s: dict(shape=f"b{b} d{d} L{side}^2", setting=json.dumps(s) if s else "default"),
                       device, log, deadline, rows)
    return rows


# --- torch.compile, in a child process with a time limit ---------------------------------------

def run_compiled_child(args, refs: dict, remaining_s: float) -> tuple[list[dict], str]:
    """Time ``fast_compiled`` in a child process (its compilation cannot be interrupted here)."""
    import signal
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="eab_compile_"))
    torch.save({k: v for k, v in refs.items()}, tmp / "refs.pt")
    sizes = sorted(args.sizes, key=lambda s: (s not in (256, 1024), s))  # the goals' sizes first
    cmd = [sys.executable, "-m", "harness.bench.gpu_eamamba", "--out", str(tmp), "--compiled-only",
           "--preset", args.preset, "--point-limit-s", str(args.point_limit_s),
           "--deadline-s", str(max(10.0, remaining_s - 20)), "--sizes", *map(str, sizes)]
    if args.compile_dynamic:
        cmd.append("--compile-dynamic")
    t0 = time.time()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        proc.wait(timeout=remaining_s)
        status = f"child exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and its compile workers
        proc.wait()
        status = f"child killed after {remaining_s:.0f} s"
    rows = []
    if (tmp / "compiled_rows.json").exists():
        rows = json.loads((tmp / "compiled_rows.json").read_text())
    note = f"Compilation and first capture are in first_call_s of the first size; phase took {time.time() - t0:.0f} s ({status})."
    return rows, note


def compiled_child(args, device):
    refs = torch.load(Path(args.out) / "refs.pt")
    torch.manual_seed(0)
    model = hm.create(args.preset).to(device).eval()
    compiled = torch.compile(model, dynamic=bool(args.compile_dynamic))
    rows: list[dict] = []
    deadline = time.time() + args.deadline_s

    def log(row):
        rows.append(row)
        print(json.dumps({k: (fmt(v) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        (Path(args.out) / "compiled_rows.json").write_text(json.dumps(rows))

    for size in args.sizes:  # one size at a time, so a kill keeps the sizes already timed
        phase_inference(args, device, model, log, deadline, ["fast_compiled"], [size], refs,
                        models={"fast_compiled": compiled})


def kernel_resources() -> list[dict]:
    """Registers / spills of every compiled variant of the scan kernels (Triton's caches)."""
    out = []
    for name in ("_fwd_kernel", "_bwd_seg_kernel", "_carry_kernel", "_bwd_kernel"):
        fn = getattr(st, name, None)
        try:
            caches = getattr(fn, "device_caches", None) or {}
            kernels = []
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                kernels += list(cache.values())
            if not kernels:
                continue
            regs = sorted({getattr(k, "n_regs", -1) for k in kernels})
            spills = sorted({getattr(k, "n_spills", -1) for k in kernels})
            shared = sorted({getattr(k, "shared", -1) for k in kernels})
            warps = sorted({getattr(getattr(k, "metadata", None), "num_warps", -1) for k in kernels})
            out.append(dict(kernel=name, variants=len(kernels), n_regs=str(regs), n_spills=str(spills),
                            shared=str(shared), num_warps=str(warps)))
        except Exception as e:  # noqa: BLE001
            out.append(dict(kernel=name, variants="?", n_regs=fail_text(e)))
    return out


# --- output -------------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        if v == 0:
            return "0"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]):
    if not rows:
        return
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def inference_pivot(rows) -> tuple[list[dict], list[str]]:
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    table = []
    for size in sorted({r["size"] for r in rows}):
        line = {"size": f"{size}²"}
        for p in paths:
            r = next((r for r in rows if r["size"] == size and r["path"] == p), None)
            if r is None:
                continue
            line[f"{p} ms"] = r["ms"] if r["ms"] == r["ms"] else r.get("note", "–")
            line[f"{p} MB"] = r.get("peak_MB", float("nan"))
        rel_ = next((r for r in rows if r["size"] == size and r["path"] == "fast"), {})
        fast_ms = rel_.get("ms", float("nan"))
        rl = next((r for r in rows if r["size"] == size and r["path"] == "release"), {})
        line["speed-up fast vs release"] = (rl.get("ms", float("nan")) / fast_ms) if fast_ms == fast_ms else float("nan")
        diffs = [r["max_rel_diff"] for r in rows if r["size"] == size and "max_rel_diff" in r
                 and PATHS[r["path"]].precision == "strict" and not PATHS[r["path"]].bf16]
        line["max rel diff, strict-fp32 paths"] = max(diffs) if diffs else float("nan")
        dflt = next((r for r in rows if r["size"] == size and r["path"] == "fast_default"), {})
        line["rel diff fast_default vs release_default"] = dflt.get("max_rel_diff", float("nan"))
        table.append(line)
    cols = ["size"] + [c for p in paths for c in (f"{p} ms", f"{p} MB")] + [
        "speed-up fast vs release", "max rel diff, strict-fp32 paths", "rel diff fast_default vs release_default"]
    return table, cols


def plots(out: Path, inf_rows, train_rows):
    """One figure (plots.png): inference latency and peak memory vs size, training step times."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, key, ylabel in ((axes[0], "ms", "ms per forward (batch 1)"), (axes[1], "peak_MB", "peak allocated MB")):
        drawn = False
        for p in PATHS:
            pts = [(r["size"], r.get(key)) for r in inf_rows if r["path"] == p and isinstance(r.get(key), float)
                   and r.get(key) == r.get(key) and r.get("ms") == r.get("ms")]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p)
                drawn = True
        if drawn:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set_xlabel("image side (pixels)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"EAMamba inference: {ylabel}")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    specs = sorted({(r["batch"], r["size"]) for r in train_rows}, key=lambda s: s[1])
    paths = [p for p in TRAIN_PATHS if any(r["path"] == p and r.get("ms") == r.get("ms") for r in train_rows)]
    if specs and paths:
        width = 0.8 / len(paths)
        for i, p in enumerate(paths):
            vals = []
            for bsz, size in specs:
                r = next((r for r in train_rows if r["path"] == p and r["batch"] == bsz and r["size"] == size), {})
                vals.append(r.get("ms", float("nan")))
            ax.bar([j + i * width for j in range(len(specs))], vals, width, label=p)
        ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(specs))])
        ax.set_xticklabels([f"{b}×{s}²" for b, s in specs])
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_ylabel("ms per training step (fwd + bwd + AdamW)")
    ax.set_title("EAMamba training step, fp32")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plots.png", dpi=110)
    plt.close(fig)


def env_info(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "missing"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    info["interpret"] = st.INTERPRET
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="eamamba")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--train", nargs="*", default=["8x128", "2x256", "1x384"])
    parser.add_argument("--paths", nargs="+", default=INFERENCE_ORDER, choices=INFERENCE_ORDER,
                        help="inference paths, in the order they run (torch/release first: the references)")
    parser.add_argument("--train-paths", nargs="+", default=TRAIN_PATHS, choices=TRAIN_PATHS)
    parser.add_argument("--torch-train", nargs="*", default=["8x128"],
                        help="training specs also run on the (slow) torch path")
    parser.add_argument("--deadline-s", type=float, default=480.0, help="stop starting new points after this")
    parser.add_argument("--point-limit-s", type=float, default=20.0, help="skip points estimated slower")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--no-kernel", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweeps", nargs="+", default=["step_bwd", "step_fwd", "tile"],
                        choices=["step_bwd", "step_fwd", "tile"], help="which kernel-knob sweeps run")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-path", default="fast_eager", choices=[p for p in PATHS if not PATHS[p].graph],
                        help="the (eager) path whose kernels are profiled")
    parser.add_argument("--train-first", action="store_true", help="run the training phase before inference")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) + CUDA graph")
    parser.add_argument("--compile-dynamic", action="store_true", help="one dynamic-shape compilation for all sizes")
    parser.add_argument("--compile-deadline-s", type=float, default=560.0,
                        help="the compiled phase (a child process) is killed at this time since start")
    parser.add_argument("--compiled-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    start = time.time()
    deadline = start + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cudnn_tf32_default = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.compiled_only:
        compiled_child(args, device)
        return
    command = "python -m harness.bench.gpu_eamamba " + " ".join(sys.argv[1:] if argv is None else argv)
    env = env_info(device)
    env["cudnn_tf32_default"] = cudnn_tf32_default  # this run sets TF32 per path (see PATHS)
    print("environment:", json.dumps(env), flush=True)

    def log(row):
        print(json.dumps({k: (fmt(v) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    md = [f"# EAMamba on {env.get('gpu', device.type)}: fast paths vs torch backend vs released-style path", "",
          f"Command: `{command}`", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]

    def save():
        (out / "gpu_eamamba.md").write_text("\n".join(md) + "\n")

    torch.manual_seed(0)
    model = hm.create(args.preset).to(device).eval()
    if not args.no_checks:
        rows = phase_checks(args, device, model, log)
        write_csv(out / "checks.csv", rows)
        md += ["## Correctness", "", "Relative error ‖ours − ref‖/‖ref‖; refs in float64 (torch backend).", "",
               markdown_table(rows, ["check", "max_rel", "tol", "detail"]), ""]
        save()
        print(md[-2], flush=True)
    if not args.no_kernel:
        bw = copy_bandwidth(device)
        rows = phase_kernel(args, device, log)
        write_csv(out / "scan_kernel.csv", rows)
        md += ["## Scan kernel", "",
               f"Measured device copy: {fmt(bw)} TB/s (read + write); datasheet {DATASHEET_TBPS} TB/s. "
               "min_MB: each input read once, each output written once (fp32). design_MB adds the "
               "segment pass's re-read of u, Δ, B.", "",
               markdown_table(rows, ["shape", "variant", "segments", "ms", "min_MB", "TBps_min_bytes", "pct_datasheet",
                                     "design_MB", "TBps_design_bytes", "note"]), ""]
        save()
        print(md[-2], flush=True)
    train_rows = None
    if args.train_first:
        train_rows = phase_training(args, device, model, log, deadline, [])
        write_csv(out / "training.csv", train_rows)
    refs: dict = {}
    inf_rows = phase_inference(args, device, model, log, deadline, args.paths, args.sizes, refs)
    write_csv(out / "inference.csv", inf_rows)
    table, cols = inference_pivot(inf_rows)
    md += ["## Inference, batch 1, ms (median) and peak allocated MB", "",
           "Peak: the model's weights plus the most the point allocated on top of what was resident "
           "when it started (warm-up, capture and timed calls).", "",
           markdown_table(table, cols), "", "Long form (first_call_s includes compilation / graph capture):", "",
           markdown_table(inf_rows, ["size", "path", "ms", "reps", "peak_MB", "max_rel_diff", "diff_vs", "first_call_s", "note"]), ""]
    save()
    print(md[-6], flush=True)
    if not args.no_profile and time.time() < deadline:
        for title, rows in phase_profile(args, device, model, log):
            md += [f"## GPU time by kernel: {title}", "", markdown_table(rows, ["kernel", "calls", "ms", "pct"]), ""]
        save()
    if train_rows is None:
        train_rows = phase_training(args, device, model, log, deadline, inf_rows)
        write_csv(out / "training.csv", train_rows)
    md += ["## Training step (forward + backward + AdamW, L1 loss, fp32)", "",
           markdown_table(train_rows, ["batch", "size", "path", "ms", "reps", "images_per_s", "peak_MB", "first_call_s", "note"]), ""]
    save()
    print(md[-2], flush=True)
    if not args.no_sweep and time.time() < deadline:
        rows = phase_sweep(args, device, log, deadline)
        md += ["## Kernel settings sweep (routed all_around forward / backward, ms)", "",
               markdown_table(rows, ["shape", "setting", "fwd_routed_ms", "bwd_routed_ms", "note"]), ""]
        save()
        print(md[-2], flush=True)
    res = kernel_resources()
    if res:
        md += ["## Compiled Triton kernels (registers, spills)", "",
               markdown_table(res, ["kernel", "variants", "n_regs", "n_spills", "shared", "num_warps"]), ""]
        save()
        print(md[-2], flush=True)
    if args.compile and device.type == "cuda":
        remaining = args.compile_deadline_s - (time.time() - start)
        if remaining < 30:
            md += ["## torch.compile", "", "not run (no time left)", ""]
        else:
            rows, note = run_compiled_child(args, refs, remaining)
            inf_rows += rows
            write_csv(out / "inference.csv", inf_rows)
            table, cols = inference_pivot(inf_rows)
            md += [f"## Inference with torch.compile(dynamic={bool(args.compile_dynamic)}) + CUDA graph (fast_compiled)",
                   "", note, "",
                   markdown_table(table, cols), "",
                   markdown_table(rows, ["size", "path", "ms", "reps", "peak_MB", "max_rel_diff", "diff_vs",
                                         "first_call_s", "note"]), ""]
            print("\n".join(md[-6:]), flush=True)
        save()
    plots(out, inf_rows, train_rows)
    md += [f"Total wall time: {time.time() - start:.0f} s"]
    save()
    print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
