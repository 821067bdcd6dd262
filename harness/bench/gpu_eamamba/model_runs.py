"""Phases 3 and 4 (the model: inference and training steps per path), the kernel profile, and the
torch.compile path in a child process."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import harness.models as hm
from harness.bench.gpu_eamamba.paths import (
    PATHS,
    allocated_mb,
    autocast_ctx,
    fail_text,
    memory_format,
    model_mb,
    path_settings,
    point_peak_mb,
    rel,
    reset_peak,
    sync,
    timed,
)
from harness.bench.gpu_eamamba.report import fmt


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

