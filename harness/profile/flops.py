"""FLOPs in the papers' convention (fvcore multiply-adds) and exact parameter counts.

Convention (EAMamba, VMamba, MambaIR and the efficient-SR literature): fvcore's
``FlopCountAnalysis`` with one multiply-add counted as one FLOP for conv / linear / matmul /
einsum; ``nn.LayerNorm`` as 5·numel; adaptive average pooling as numel; GELU, SiLU,
LeakyReLU, neg, exp, flip and pixel (un)shuffle ignored; and the selective scan, which fvcore
cannot see into, as 9·B·L·D·N + B·D·L (+ B·D·L when the z gate is fused into the scan).
So the "GFLOPs" of those papers are GMACs: ``FlopResult.gmacs`` is the same number, and
``gflops_2x`` the 2-per-multiply-add figure other tools print.

The model is traced with the ``shape_only`` scan backend: the opaque scan node returns zeros
of the right shape, so counting at any resolution never runs the recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from harness.ops import use_backend

CONVENTION = "fvcore multiply-adds (1 MAC = 1 FLOP), scan 9BLDN+BDL, LayerNorm 5*numel"
IGNORED_OPS = (
    "aten::gelu", "aten::silu", "aten::silu_", "aten::leaky_relu", "aten::leaky_relu_", "aten::neg", "aten::exp",
    "aten::flip", "aten::pixel_shuffle", "aten::pixel_unshuffle",
)


def count_params(model: nn.Module) -> int:
    """Exact number of parameters (sum of numel; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _sizes(value) -> list[int] | None:
    try:
        return list(value.type().sizes())
    except (AttributeError, RuntimeError):
        return None


def selective_scan_flops(inputs: list, outputs: list) -> int:
    """fvcore handle for ``prim::PythonOp.SelectiveScanFn``: 9·B·L·D·N + B·D·L (+B·D·L with z)."""
    shapes = [s for s in (_sizes(v) for v in inputs) if s is not None]
    b, d, L = shapes[0]  # u
    n = shapes[2][1]  # A: (d, n)
    full_size = sum(1 for s in shapes if s == [b, d, L])  # u, delta, and z when gated inside
    return 9 * b * L * d * n + b * d * L + (b * d * L if full_size >= 3 else 0)


def sdpa_flops(inputs: list, outputs: list) -> int:
    """Multiply-adds of scaled_dot_product_attention (fvcore would silently count 0)."""
    q, k = _sizes(inputs[0]), _sizes(inputs[1])
    *batch, L, dq = q
    S = k[-2]
    dv = _sizes(inputs[2])[-1]
    count = 1
    for s in batch:
        count *= s
    return count * L * S * (dq + dv)


@dataclass
class FlopResult:
    """Counts for one model at one input shape; ``total`` is in the papers' unit (MACs)."""

    total: int
    by_operator: dict[str, int]
    by_module: dict[str, int]
    unsupported: dict[str, int]
    input_shape: tuple[int, ...]
    convention: str = CONVENTION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        """Giga multiply-adds: the figure papers in this field print as "GFLOPs"."""
        return self.total / 1e9

    @property
    def gflops_2x(self) -> float:
        """Giga floating-point operations counting a multiply-add as 2 (FlopCounterMode's unit)."""
        return 2 * self.total / 1e9

    @property
    def conv_only(self) -> int:
        """Convolutions alone (e.g. Restormer's widely quoted 141 G excludes its attention matmuls)."""
        return self.by_operator.get("conv", 0)

    def top_modules(self) -> dict[str, int]:
        """Counts of the model's direct children (the first level of the module tree)."""
        return {k: v for k, v in self.by_module.items() if k and "." not in k}


def count_flops(model: nn.Module, input_shape: Sequence[int], device: str | torch.device | None = None) -> FlopResult:
    """Trace ``model`` on zeros of ``input_shape`` and count FLOPs in the papers' convention."""
    from fvcore.nn import FlopCountAnalysis

    if any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be positive sizes, got {tuple(input_shape)}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(*input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        with use_backend("shape_only"), torch.no_grad():
            analysis = FlopCountAnalysis(model, x)
            analysis.set_op_handle("prim::PythonOp.SelectiveScanFn", selective_scan_flops)
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flops)
            for op in IGNORED_OPS:
                analysis.set_op_handle(op, None)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = int(analysis.total())
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            by_module = {k: int(v) for k, v in analysis.by_module().items()}
            unsupported = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    return FlopResult(total, by_operator, by_module, unsupported, tuple(int(s) for s in input_shape))
