"""Profiling: FLOPs (paper convention), parameters, latency, memory, cost versus resolution."""

from harness.profile.flops import FlopResult, count_flops, count_params

__all__ = ["FlopResult", "count_flops", "count_params"]
