"""Small timing helpers for CPU/CUDA benchmarks: warm-up, synchronisation, repeats, medians."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 2, repeats: int = 5,
              min_warmup_s: float = 0.0) -> dict[str, float]:
    """Median / p90 / min milliseconds of ``fn()`` after warm-up, synchronising on CUDA."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < min_warmup_s:
        fn()
        done += 1
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"median_ms": statistics.median(times), "p90_ms": p90, "min_ms": times[0], "repeats": repeats}


def environment() -> dict[str, str]:
    """Hardware and software facts to print beside every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"cpu": cpu, "threads": str(torch.get_num_threads()), "torch": torch.__version__,
           "python": platform.python_version()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    return env
