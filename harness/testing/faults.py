"""A tiny restoration network that fails on purpose, to test that sweeps survive failures.

``mode``: "ok" (a working 3-layer CNN), "raise" (RuntimeError in forward), "nan_loss" (NaN output
while training, so the loss is NaN), "nan_output" (NaN output in eval mode only),
"oom" (torch.OutOfMemoryError in forward, as a GPU would raise it).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class FaultyNet(nn.Module):
    pad_multiple = 1

    def __init__(self, mode: str = "ok", channels: int = 3, width: int = 8):
        super().__init__()
        if mode not in ("ok", "raise", "nan_loss", "nan_output", "oom"):
            raise ValueError(f"unknown fault mode {mode!r}")
        self.mode = mode
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "raise":
            raise RuntimeError("injected failure")
        if self.mode == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        y = x + self.body(x)
        if (self.mode == "nan_loss" and self.training) or (self.mode == "nan_output" and not self.training):
            y = y * float("nan")
        return y


def faulty_model_config(mode: str) -> dict:
    """A model config (as a preset file would hold) for ``FaultyNet(mode)``."""
    return {"_target_": "harness.testing.faults.FaultyNet", "mode": mode,
            "meta": {"family": "faulty", "input_range": [0, 1], "pad_multiple": 1, "scale": 1, "in_channels": 3,
                     "flops_input": [1, 3, 32, 32], "preset": f"faulty_{mode}"}}
