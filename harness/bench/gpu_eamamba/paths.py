"""The benchmark's paths (how one run executes the model), its scan backend for the released-style
reference, and the timing and memory helpers every phase uses."""

from __future__ import annotations

import contextlib
import gc
from typing import NamedTuple

import torch

from harness.ops import ScanBackend, register_backend, use_backend, use_route_mode
from harness.ops import scan_triton_launch as launch
from harness.ops.scan_triton import is_available as triton_available
from harness.ops.scan_triton import supports as triton_supports
from harness.ops.scan_triton_launch import scan_settings
from harness.profile.timing import time_call

DATASHEET_TBPS = 4.8
CHECK_TOL_MODEL = 1e-4


def release_style_forward(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """The released structure's scan: one program per channel over the whole sequence, no
    segments (what mamba_ssm's kernel does at batch 1), as the tile kernel with one channel per
    program. A one-step-at-a-time kernel in this role was an order of magnitude slower on an
    H200, which would flatter the fast paths."""
    return launch.forward_tile(u, delta, A, B, C, D, delta_bias, delta_softplus, block_d=1, seg_tiles=1 << 30)


def release_style_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy):
    """The gradients of ``release_style_forward`` (tile kernels, one channel per program)."""
    return launch.backward_tile(u, delta, A, B, C, D, delta_bias, delta_softplus, dy.contiguous(), block_d=1,
                                seg_tiles=1 << 30)


register_backend(ScanBackend("release_scan", release_style_forward, release_style_backward, triton_available,
                             triton_supports))


class PathSpec(NamedTuple):
    """How one benchmark path runs the model. precision: "strict" (no TF32 anywhere), "default"
    (PyTorch's defaults: TF32 in cuDNN convolutions, not in matrix products), "tf32" (both).
    route_mode: ``harness.ops.use_route_mode``'s mode. kernel / fuse_max: the forward and backward
    kernel family and the largest fused map (None: ``TritonScanSettings``' defaults)."""

    backend: str
    route_mode: str
    graph: bool
    precision: str
    bf16: bool
    kernel: str | None
    fuse_max: int | None
    channels_last: bool
    cudnn_benchmark: bool = False  # let cuDNN time its algorithms per shape (exact in strict fp32 too)


PATHS = {
    # name: PathSpec(scan backend, route mode, graph, precision, bf16, forward kernel, largest
    #       fused map, channels_last model and input)
    "fast": PathSpec("triton", "auto", True, "strict", False, None, None, False),
    "fast_eager": PathSpec("triton", "auto", False, "strict", False, None, None, False),
    "fast_cl": PathSpec("triton", "auto", True, "strict", False, None, None, True),
    "fast_bench": PathSpec("triton", "auto", True, "strict", False, None, None, False, True),
    "fast_default": PathSpec("triton", "auto", True, "default", False, None, None, False),
    "fast_tf32": PathSpec("triton", "auto", True, "tf32", False, None, None, False),
    "fast_bf16": PathSpec("triton", "auto", True, "strict", True, None, None, False),
    "tile_fused": PathSpec("triton", "auto", True, "strict", False, "tile", 1 << 17, False),
    "triton_unfused": PathSpec("triton", "materialised", False, "strict", False, None, None, False),
    "release": PathSpec("release_scan", "materialised", False, "strict", False, "tile", None, False),
    "release_default": PathSpec("release_scan", "materialised", False, "default", False, "tile", None, False),
    "torch": PathSpec("torch", "auto", False, "strict", False, None, None, False),
    "fast_compiled": PathSpec("triton", "auto", True, "strict", False, None, None, False),  # + torch.compile
}
TRAIN_PATHS = ["fast", "fast_eager", "fast_default", "tile_fused", "release", "release_default", "torch"]
PRECISIONS = {"strict": (False, False), "default": (False, True), "tf32": (True, True)}  # (matmul, cudnn)


def memory_format(path: str):
    return torch.channels_last if PATHS[path].channels_last else torch.contiguous_format


@contextlib.contextmanager
def path_settings(name: str):
    """Run the block as path ``name``: its scan backend, route mode, kernel settings and precision."""
    spec = PATHS[name]
    kernels = {}
    if spec.kernel:
        kernels.update(forward_kernel=spec.kernel, backward_kernel=spec.kernel)
    if spec.fuse_max:
        kernels.update(fuse_max_positions=spec.fuse_max)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = spec.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = PRECISIONS[spec.precision]
    try:
        with use_backend(spec.backend), use_route_mode(spec.route_mode), scan_settings(**kernels):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = old


def autocast_ctx(name: str, device):
    if PATHS[name].bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


# --- timing and memory ------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, min_reps=3, max_reps=25, target_s=1.0) -> tuple[float, int]:
    """Median ms of fn() and the number of timed calls (``time_call``: one warm-up call, then at
    least ``min_reps`` and at most ``max_reps`` calls or ``target_s`` seconds; CUDA events on a GPU)."""
    r = time_call(fn, device, warmup=1, repeats=max_reps, min_repeats=min_reps, max_time_s=target_s,
                  timer="cuda_event" if device.type == "cuda" else "wall")
    return r["median_ms"], r["repeats"]


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def allocated_mb(device) -> float:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def model_mb(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def point_peak_mb(device, base_mb: float, model: torch.nn.Module) -> float:
    """Peak allocated memory of one point as a fresh process would see it: the model's weights
    plus the most the point allocated on top of what was resident when it started (other
    paths' cached tensors, references, inputs), so figures do not depend on the run's order."""
    return peak_mb(device) - base_mb + model_mb(model)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def max_rel(pairs) -> float:
    return max(rel(a, b) for a, b in pairs)


def fail_text(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

