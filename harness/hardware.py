"""CPU threads for a run: how many intra-op threads, and how idle threads wait.

PyTorch's CPU build parallelises each operator over an OpenMP team. A team finishes an operator
only when its slowest thread does, and by default an idle OpenMP thread spins before it sleeps.
When another process holds one of the cores, one thread of the team is descheduled at every
operator while the others spin for it, so a small model's training step can slow down by more than
an order of magnitude instead of by the share of the machine it lost
(``reports/hardware/cpu/busy_neighbour.md`` measures it). Two settings fix that:

- ``OMP_WAIT_POLICY=PASSIVE``: idle threads sleep at once instead of spinning. The OpenMP runtime
  reads it when it is loaded, so it is set (unless the user set it) by ``harness/__init__.py``,
  before anything imports torch; ``wait_policy()`` says what the runtime actually got.
- ``hardware.threads: null`` (the default, or "auto"; ``conf/hardware/cpu.yaml``): as many threads
  as the cores this process may use (``os.sched_getaffinity``) minus the cores other processes
  kept busy during a short sample of ``/proc/stat``, at least one.

``configure_threads`` applies the choice and returns it; the runner stores it in the run record's
``environment`` (key ``cpu_threads``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

WAIT_POLICY_VAR = "OMP_WAIT_POLICY"
# Value of OMP_WAIT_POLICY when harness was first imported, and whether torch was loaded before:
# set by harness/__init__.py, read by wait_policy().
_WAIT_POLICY_AT_IMPORT: dict[str, Any] = {}


def set_default_wait_policy() -> None:
    """Ask for passive OpenMP waiting unless the user chose a policy; record whether it can apply.

    Called from ``harness/__init__.py``: the OpenMP runtime reads the variable once, when torch
    loads it, so a process that imported torch before harness keeps the runtime's default.
    """
    import sys

    if _WAIT_POLICY_AT_IMPORT:
        return
    user_value = os.environ.get(WAIT_POLICY_VAR)
    torch_loaded = "torch" in sys.modules
    if user_value is None and not torch_loaded:
        os.environ[WAIT_POLICY_VAR] = "PASSIVE"
    _WAIT_POLICY_AT_IMPORT.update(user_value=user_value, torch_loaded_first=torch_loaded)


def wait_policy() -> str:
    """The OpenMP wait policy in force: "passive", "active", or "default" (the runtime's own)."""
    if _WAIT_POLICY_AT_IMPORT.get("torch_loaded_first"):
        value = _WAIT_POLICY_AT_IMPORT.get("user_value")
    else:
        value = os.environ.get(WAIT_POLICY_VAR)
    return value.lower() if value else "default"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a cgroup cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times(cpus: set[int]) -> tuple[float, float]:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat."""
    busy = total = 0.0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle = values[3] + values[4]
            total += sum(values)
            busy += sum(values) - idle
    return busy, total


def busy_cores(interval_s: float = 0.3) -> float | None:
    """How many of this process's cores other processes kept busy over ``interval_s`` seconds.

    This process sleeps while it samples, so what is counted is everyone else's load. None where
    /proc/stat cannot be read.
    """
    try:
        cpus = os.sched_getaffinity(0)
        b0, t0 = _cpu_times(cpus)
        time.sleep(interval_s)
        b1, t1 = _cpu_times(cpus)
    except (AttributeError, OSError, ValueError):
        return None
    if t1 <= t0:
        return None
    return len(cpus) * (b1 - b0) / (t1 - t0)


def choose_threads(requested: int | str | None = None, *, sample_s: float = 0.3) -> dict[str, Any]:
    """The intra-op thread count for ``requested`` and why: a positive int is taken as given;
    None or "auto" uses the cores left free by other processes; "torch" keeps torch's default."""
    import torch

    cores = available_cores()
    choice: dict[str, Any] = {"requested": requested, "available_cores": cores, "wait_policy": wait_policy()}
    if requested == "torch":
        choice.update(threads=torch.get_num_threads(), rule="torch default")
    elif requested is None or requested == "auto":
        busy = busy_cores(sample_s)
        free = cores if busy is None else cores - busy
        # Round down from x.6 upwards only: a core 40 % busy still gives its thread most of its time.
        threads = max(1, min(cores, math.floor(free + 0.4)))
        choice.update(threads=threads, busy_cores=None if busy is None else round(busy, 2),
                      rule="available cores minus cores busy with other processes (/proc/stat sample)")
    else:
        try:
            threads = int(requested)
        except (TypeError, ValueError):
            threads = 0
        if threads < 1:
            raise ValueError(f"hardware.threads must be a positive integer, 'auto', 'torch' or null, "
                             f"got {requested!r}")
        choice.update(threads=threads, rule="set in the config")
    return choice


def configure_threads(requested: int | str | None = None) -> dict[str, Any]:
    """Choose the intra-op thread count (see ``choose_threads``), apply it, and return the choice."""
    import torch

    choice = choose_threads(requested)
    if choice["threads"] != torch.get_num_threads():
        torch.set_num_threads(int(choice["threads"]))
    choice["interop_threads"] = torch.get_num_interop_threads()
    return choice
