"""Phase 2 (the scan kernels alone: time and bandwidth), phase 5 (a sweep of the kernels' settings)
and the compiled kernels' resources."""

from __future__ import annotations

import json
import time
import traceback

import torch

from harness.bench.gpu_eamamba.checks import scan_case
from harness.bench.gpu_eamamba.paths import (
    DATASHEET_TBPS,
    fail_text,
    release_style_backward,
    release_style_forward,
    reset_peak,
    sync,
    timed,
)
from harness.ops import ROUTE_SETS, route_index, scan_triton_step, scan_triton_tile, selective_scan
from harness.ops import scan_triton_launch as launch
from harness.ops.scan_triton_launch import scan_settings


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
        idx = route_index(ROUTE_SETS["all_around"], side, side, device).steps
        min_fwd = 4 * b * (3 * d * L + 2 * g * n * L)
        min_bwd = 4 * b * (5 * d * L + 4 * g * n * L)
        cfg = launch.tile_config(b, g, d // g, L, n, device, False)
        step_nseg = launch.step_segments(b, d, L, device)[1]
        nseg_default = step_nseg if launch.forward_kernel_in_use() == "step" else cfg["NSEG"]
        design_fwd = min_fwd + (4 * b * (2 * d * L + g * n * L) if nseg_default > 1 else 0)
        cl3, cl4 = launch.seq_channels_last, launch.bc_channels_last
        u_cl, dl_cl, B_cl, C_cl, dy_cl = cl3(u), cl3(dl), cl4(B), cl4(C), cl3(dy)
        out_cl = torch.empty(b, L, d, device=device).transpose(1, 2)
        variants = {
            "triton fwd": lambda: launch.forward_tile(u, dl, A, B, C, D, bias, True),
            "triton fwd (step kernel)": lambda: launch.forward_step(u, dl, A, B, C, D, bias, True),
            "step kernel, channels-last": lambda: launch.forward_step(u_cl, dl_cl, A, B_cl, C_cl, D, bias, True,
                                                                   out=out_cl),
            "step kernel, channels-last, routed": lambda: launch.forward_step(u_cl, dl_cl, A, B_cl, C_cl, D, bias, True,
                                                                           idx=idx, out=out_cl),
            "triton fwd, routed (all_around)": lambda: launch.forward_tile(u, dl, A, B, C, D, bias, True, idx=idx),
            "triton bwd": lambda: launch.backward_tile(u, dl, A, B, C, D, bias, True, dy),
            "triton bwd, routed": lambda: launch.backward_tile(u, dl, A, B, C, D, bias, True, dy, idx=idx),
            "step bwd, channels-last, routed": lambda: launch.backward_step(u_cl, dl_cl, A, B_cl, C_cl, D, bias, True,
                                                                        dy_cl, idx=idx),
            "per-channel fwd (release-style)": lambda: release_style_forward(u, dl, A, B, C, D, bias, True),
            "per-channel bwd (release-style)": lambda: release_style_backward(u, dl, A, B, C, D, bias, True, dy),
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


def _time_settings(settings, fns, row_base, device, log, deadline, rows, min_reps=3, max_reps=10):
    """For each dict of ``TritonScanSettings`` changes: time every fn in ``fns`` (name -> callable,
    forward and backward kernels alike) under ``scan_settings(**changes)``."""
    for s in settings:
        if time.time() > deadline:
            break
        row = dict(row_base(s))
        try:
            with torch.no_grad(), scan_settings(**s):
                for fn in fns.values():
                    fn()
                sync(device)
                for name, fn in fns.items():
                    row[name], _ = timed(fn, device, min_reps=min_reps, max_reps=max_reps, target_s=0.2)
        except Exception as e:  # noqa: BLE001
            row["note"] = fail_text(e)
        rows.append(row)
        log(row)


def sweep_step_kernel(device, log, deadline) -> list[dict]:
    """The step kernel's knobs on channels-last, routed inputs at the model's level-1 shapes."""
    rows: list[dict] = []
    # each iteration waits for one memory round trip (positions read an iteration ahead, loads
    # before stores): unroll trades steps in flight per warp against registers (warps per SM)
    settings = [{}, dict(step_unroll=1), dict(step_unroll=2), dict(step_unroll=8), dict(step_warps=2),
                dict(step_warps_per_sm=64, step_min_segment=16), dict(step_warps_per_sm=64, step_min_segment=64),
                dict(step_warps_per_sm=16), dict(step_unroll=2, step_warps_per_sm=64, step_min_segment=16),
                dict(step_unroll=1, step_warps_per_sm=64, step_min_segment=16),
                dict(step_unroll=2, step_maxnreg=128), dict(step_unroll=4, step_maxnreg=168)]
    g, n = 8, 16
    for b, d, side in [(1, 64, 256), (1, 64, 1024), (8, 64, 128), (1, 512, 32)]:
        L = side * side
        inp = {k: v.float() for k, v in scan_case(b, d, L, n, g, device, seed=9).items()}
        u, dl, A, B, C, D, bias = (inp[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
        u, dl = launch.seq_channels_last(u), launch.seq_channels_last(dl)
        B, C = launch.bc_channels_last(B), launch.bc_channels_last(C)
        out = torch.empty(b, L, d, device=device).transpose(1, 2)
        idx = route_index(ROUTE_SETS["all_around"], side, side, device).steps
        fns = {"fwd_routed_ms": lambda: launch.forward_step(u, dl, A, B, C, D, bias, True, idx=idx, out=out)}
        _time_settings(settings, fns,
                       lambda s: dict(shape=f"b{b} d{d} L{side}^2", setting="step " + (json.dumps(s) if s else "default"),
                                      segments=launch.step_segments(b, d, L, device)[1]),
                       device, log, deadline, rows, max_reps=20)
        del inp, u, dl, A, B, C, D, bias, out
        reset_peak(device)
    return rows


def sweep_step_backward(device, log, deadline) -> list[dict]:
    """The step backward's knobs (unroll, segments, register cap) on channels-last, routed inputs."""
    rows: list[dict] = []
    settings = [{}, dict(step_bwd_unroll=2), dict(step_warps_per_sm=64),
                dict(step_warps_per_sm=64, step_min_segment=16), dict(step_warps_per_sm=16),
                dict(step_maxnreg=168), dict(step_bwd_unroll=2, step_warps_per_sm=64, step_min_segment=16)]
    g, n = 8, 16
    for b, d, side in [(8, 64, 128), (1, 64, 256), (8, 128, 64), (1, 512, 32)]:
        L = side * side
        inp = {k: v.float() for k, v in scan_case(b, d, L, n, g, device, seed=9).items()}
        u, dl, dy = (launch.seq_channels_last(inp[k]) for k in ("u", "delta", "z"))
        B, C = launch.bc_channels_last(inp["B"]), launch.bc_channels_last(inp["C"])
        A, D, bias = inp["A"], inp["D"], inp["delta_bias"]
        idx = route_index(ROUTE_SETS["all_around"], side, side, device).steps
        fns = {"bwd_routed_ms": lambda: launch.backward_step(u, dl, A, B, C, D, bias, True, dy, idx=idx)}
        _time_settings(settings, fns,
                       lambda s: dict(shape=f"b{b} d{d} L{side}^2",
                                      setting="step bwd " + (json.dumps(s) if s else "default"),
                                      segments=launch.step_segments(b, d, L, device)[1]),
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
    settings = [{}, dict(programs_per_sm=2), dict(programs_per_sm=8), dict(fwd_tile_elements=2048),
                dict(fwd_tile_elements=8192, fwd_warps=8), dict(max_block_d=4), dict(bwd_tile_elements=4096, bwd_warps=8),
                dict(bwd_tile_elements=1024), dict(max_block_d=16, fwd_tile_elements=8192, fwd_warps=8)]
    g, n = 8, 16
    for b, d, side in [(1, 64, 256), (8, 64, 128)]:
        L = side * side
        inp = {k: v.float() for k, v in scan_case(b, d, L, n, g, device, seed=9).items()}
        u, dl, A, B, C, D, bias, dy = (inp[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias", "z"))
        idx = route_index(ROUTE_SETS["all_around"], side, side, device).steps
        fns = {"fwd_routed_ms": lambda: launch.forward_tile(u, dl, A, B, C, D, bias, True, idx=idx),
               "bwd_routed_ms": lambda: launch.backward(u, dl, A, B, C, D, bias, True, dy, idx=idx)}
        _time_settings(settings, fns,
                       lambda s: dict(shape=f"b{b} d{d} L{side}^2", setting=json.dumps(s) if s else "default"),
                       device, log, deadline, rows)
    return rows



def kernel_resources() -> list[dict]:
    """Registers / spills of every compiled variant of the scan kernels (Triton's caches)."""
    out = []
    if scan_triton_step.triton is None:
        return out
    kernels = {name: getattr(module, name) for module, names in (
        (scan_triton_step, ("step_fwd_kernel", "step_bwd_kernel", "segment_carry_kernel")),
        (scan_triton_tile, ("tile_fwd_kernel", "tile_bwd_segment_kernel", "tile_carry_kernel", "tile_bwd_kernel")),
    ) for name in names}
    for name, fn in kernels.items():
        try:
            caches = getattr(fn, "device_caches", None) or {}
            compiled = []
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                compiled += list(cache.values())
            if not compiled:
                continue
            regs = sorted({getattr(k, "n_regs", -1) for k in compiled})
            spills = sorted({getattr(k, "n_spills", -1) for k in compiled})
            shared = sorted({getattr(k, "shared", -1) for k in compiled})
            warps = sorted({getattr(getattr(k, "metadata", None), "num_warps", -1) for k in compiled})
            out.append(dict(kernel=name, variants=len(compiled), n_regs=str(regs), n_spills=str(spills),
                            shared=str(shared), num_warps=str(warps)))
        except Exception as e:  # noqa: BLE001
            out.append(dict(kernel=name, variants="?", n_regs=fail_text(e)))
    return out
