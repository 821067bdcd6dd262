"""The ``triton`` selective-scan backend: Triton kernels, forward and backward, registered here.

Where things are:
- ``harness/ops/scan_triton_step.py``: the step kernels (one step at a time, one thread per
  channel; the default forward and backward);
- ``harness/ops/scan_triton_tile.py``: the tile kernels (associative scans over tiles of steps;
  the backward of groups the step kernels cannot block, and the step kernel's fallback);
- ``harness/ops/scan_triton_launch.py``: block sizes, segments, layouts, the launchers and
  ``TritonScanSettings`` (every tuning knob; ``scan_settings(...)`` changes them in a block);
- ``harness/ops/route_scan_fused.py``: the multi-route scan with its routes fused into the
  kernels (the GPU path of ``harness.ops.route_scan.multi_route_scan``).

The backend is usable where Triton imports and CUDA is present, or on CPU tensors when
``TRITON_INTERPRET=1`` is set before import (how the tests check the kernels without a GPU).
"""

from __future__ import annotations

import torch

from harness.ops import scan_triton_launch as launch
from harness.ops.scan_triton_step import triton
from harness.ops.selective_scan import ScanBackend, register_backend

INTERPRET = launch.INTERPRET


def forward(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Backend forward: y of the selective scan (no z gate), u (b, d, L), B/C (b, g, n, L)."""
    return launch.forward(u, delta, A, B, C, D, delta_bias, delta_softplus)


def backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy):
    """Backend backward: (du, ddelta, dA, dB, dC, dD, ddelta_bias)."""
    return launch.backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy.contiguous())


def is_available() -> bool:
    """Triton imports and there is a GPU (or the interpreter runs the kernels on CPU)."""
    return triton is not None and (INTERPRET or torch.cuda.is_available())


def supports(device: torch.device) -> bool:
    """CUDA tensors (CPU tensors under the interpreter)."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


register_backend(ScanBackend("triton", forward, backward, is_available, supports))
