"""Profiling: FLOPs (paper convention), parameters, latency, memory, cost versus resolution.

One measurement path: ``timing.time_call`` is the timing loop, ``latency.measure_latency`` and
``memory.peak_memory`` the protocol's latency and peak memory, ``environment.environment`` what
they ran on. The runner, the profile jobs, the ladder and the benchmark scripts all use these.
"""

from harness.profile.environment import environment, precision_flags
from harness.profile.flops import FlopResult, count_flops, count_params
from harness.profile.latency import measure_latency
from harness.profile.memory import peak_memory
from harness.profile.timing import time_call

__all__ = ["FlopResult", "count_flops", "count_params", "environment", "measure_latency", "peak_memory",
           "precision_flags", "time_call"]
