"""eabench: benchmarking and ablation harness for EAMamba-style vision state-space models."""

from harness.hardware import set_default_wait_policy

__version__ = "0.1.0"

# Before anything imports torch: idle OpenMP threads sleep instead of spinning, so a run on a
# machine shared with another process slows down in proportion to the cores it lost.
set_default_wait_policy()
