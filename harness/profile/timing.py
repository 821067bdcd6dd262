"""The one timing loop of the harness: warm-up, synchronisation, repeats, median / p90 / min.

Used by ``harness.profile.latency`` (and through it the runner and the ladder) and by the
benchmark scripts in ``harness/bench``; what ran where is recorded by
``harness.profile.environment``.

``time_call``: wall clock by default (synchronising on CUDA), warm-up of at least ``warmup`` calls
*and* ``min_warmup_s`` seconds; the first call is never timed. Options:

- ``timer="cuda_event"``: time each call with a pair of CUDA events on the current stream (the
  protocol's preferred CUDA timer); the wall-clock median is returned beside it as ``wall_median_ms``;
- ``max_warmup_s``: stop warming up once this many seconds have passed and at least one call was
  made, so a slow CPU forward does not spend minutes warming (the protocol asks for >= 10 calls
  *or* >= 1 s; with ``max_warmup_s >= min_warmup_s`` one of the two always holds);
- ``max_time_s``: stop repeating after this many seconds of timed calls (at least ``min_repeats``);
- ``return_times=True``: include every timed call (ms) as ``times_ms``.
"""

from __future__ import annotations

import statistics
import time
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
