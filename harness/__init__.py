"""eabench: benchmarking and ablation harness for EAMamba-style vision state-space models."""

__version__ = "0.1.0"
