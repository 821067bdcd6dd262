"""Timing helpers for CPU/CUDA benchmarks: warm-up, synchronisation, repeats, medians, environment.

``time_call`` keeps its original behaviour by default (wall clock, synchronising on CUDA, warm-up of
at least ``warmup`` calls *and* ``min_warmup_s`` seconds). Keyword options added later:

- ``timer="cuda_event"``: time each call with a pair of CUDA events on the current stream (the
  protocol's preferred CUDA timer); the wall-clock median is returned beside it as ``wall_median_ms``;
- ``max_warmup_s``: stop warming up once this many seconds have passed and at least one call was
  made, so a slow CPU forward does not spend minutes warming (the protocol asks for >= 10 calls
  *or* >= 1 s; with ``max_warmup_s >= min_warmup_s`` one of the two always holds);
- ``max_time_s``: stop repeating after this many seconds of timed calls (at least ``min_repeats``);
- ``return_times=True``: include every timed call (ms) as ``times_ms``.
The first call is never timed: it is always part of the warm-up.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from functools import lru_cache
from typing import Callable

import torch


def _percentile(sorted_times: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of an ascending list."""
    return sorted_times[min(len(sorted_times) - 1, int(round(q * (len(sorted_times) - 1))))]


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 2, repeats: int = 5,
              min_warmup_s: float = 0.0, *, timer: str = "wall", max_warmup_s: float | None = None,
              max_time_s: float | None = None, min_repeats: int = 3,
              return_times: bool = False) -> dict[str, float]:
    """Median / p90 / min milliseconds of ``fn()`` after warm-up, synchronising on CUDA.

    ``timer``: ``"wall"`` (perf_counter around the call, synchronising on CUDA before reading the
    clock) or ``"cuda_event"`` (CUDA events recorded around each call; CUDA devices only).
    The result also holds ``warmup_calls`` and ``warmup_s`` (what the warm-up actually did).
    """
    device = torch.device(device)
    if timer not in ("wall", "cuda_event"):
        raise ValueError(f"timer must be 'wall' or 'cuda_event', got {timer!r}")
    if timer == "cuda_event" and device.type != "cuda":
        raise ValueError("timer='cuda_event' needs a CUDA device")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < min_warmup_s:
        fn()
        done += 1
        sync()
        if max_warmup_s is not None and time.perf_counter() - start >= max_warmup_s:
            break
    warmup_s = time.perf_counter() - start
    times, walls = [], []
    loop_start = time.perf_counter()
    for i in range(repeats):
        if timer == "cuda_event":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            begin.record()
            fn()
            end.record()
            end.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        if max_time_s is not None and i + 1 >= min_repeats and time.perf_counter() - loop_start >= max_time_s:
            break
    raw = list(times)
    times.sort()
    result = {"median_ms": statistics.median(times), "p90_ms": _percentile(times, 0.9), "min_ms": times[0],
              "repeats": len(times), "warmup_calls": done, "warmup_s": warmup_s}
    if timer == "cuda_event":
        result["wall_median_ms"] = statistics.median(walls)
    if return_times:
        result["times_ms"] = raw
    return result


@lru_cache(maxsize=1)
def nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` (None when there is no such tool)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def _cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """Hardware and software facts to print beside every figure.

    Always: cpu, threads, torch, python (the original keys), plus logical CPU count, OS, numpy.
    With CUDA: gpu (name), cuda, cudnn, driver (nvidia-smi), gpu memory, cudnn.benchmark and the
    TF32 flags. ``device`` picks which GPU is described (default: the current one).
    """
    env = {"cpu": _cpu_name(), "threads": str(torch.get_num_threads()), "torch": torch.__version__,
           "python": platform.python_version()}
    env["cpu_count"] = str(os.cpu_count())
    env["os"] = f"{platform.system()} {platform.release()}"
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        dev = torch.device(device) if device is not None else torch.device("cuda")
        index = dev.index if dev.type == "cuda" and dev.index is not None else torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(index)
        env["cuda"] = str(torch.version.cuda)
        props = torch.cuda.get_device_properties(index)
        env["gpu_memory_gb"] = f"{props.total_memory / 2**30:.1f}"
        env["gpu_count"] = str(torch.cuda.device_count())
        env["cudnn"] = str(torch.backends.cudnn.version())
        env["cudnn_benchmark"] = str(torch.backends.cudnn.benchmark)
        env["tf32_matmul"] = str(torch.backends.cuda.matmul.allow_tf32)
        env["tf32_cudnn"] = str(torch.backends.cudnn.allow_tf32)
        driver = nvidia_driver()
        if driver:
            env["driver"] = driver
    return env


def hardware_caption(env: dict[str, str], device: torch.device | str = "cpu") -> str:
    """One line naming the hardware and software behind a figure."""
    device = torch.device(device)
    if device.type == "cuda" and "gpu" in env:
        hw = f"{env['gpu']} (driver {env.get('driver', '?')}, CUDA {env.get('cuda', '?')})"
    else:
        hw = f"{env['cpu']}, {env['threads']} threads"
    return f"{hw}; torch {env['torch']}, Python {env['python']}"
