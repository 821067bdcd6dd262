"""Forward-pass latency per the measurement protocol (README.md, "Measurement protocols": latency).

Protocol: warm up (at least ``warmup`` calls and ``min_warmup_s`` seconds, capped at
``max_warmup_s`` once one call is done: the protocol's ">= 10 calls or >= 1 s" always holds),
never time the first call, then time ``repeats`` calls and report median / p90 / min. On CUDA
each call is timed with CUDA events (the wall-clock median, which includes launch overhead, is
recorded too); on CPU with ``time.perf_counter``. Every result records what produced it:
precision, TF32 flags, channels_last, torch.compile, CUDA graphs, cudnn.benchmark, batch size,
input size, device name, driver, torch / CUDA / cuDNN versions, thread count, scan backend.

Precision: ``"fp32"`` is strict float32 (TF32 off for matmuls and convolutions, the flags are
restored afterwards), ``"tf32"`` turns TF32 on (CUDA only), ``"bf16"`` runs the forward under
``torch.autocast(dtype=torch.bfloat16)`` on the model's device type (TF32 off), and
``"default"`` leaves PyTorch's flags as they are (out of the box: TF32 allowed in cuDNN
convolutions, not in matmuls), which is how release code is usually timed. The flags in force
are recorded with every result (``tf32_matmul``, ``tf32_cudnn``, ``float32_matmul_precision``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch
import torch.nn as nn

from harness.profile.environment import environment, precision_flags
from harness.profile.timing import time_call

PRECISIONS = ("fp32", "bf16", "tf32", "default")


def resolve_model(model: nn.Module | str, overrides: dict | None = None) -> tuple[nn.Module, str]:
    """A module and its display name; a string is built as a preset (``harness.models.create``)."""
    if isinstance(model, str):
        from harness.models import create

        return create(model, **(overrides or {})), model
    if overrides:
        raise ValueError("overrides apply to preset names only, not to an already built module")
    meta = getattr(model, "eabench_meta", None) or {}
    return model, str(meta.get("preset") or type(model).__name__)


def scan_backends_of(model: nn.Module, device: torch.device) -> str | None:
    """The concrete selective-scan backend(s) the model's scans resolve to on ``device``."""
    from harness.ops import resolve_backend

    names = set()
    for m in model.modules():
        name = getattr(m, "scan_backend", None)
        if isinstance(name, str):
            try:
                names.add(resolve_backend(name, device))
            except (ValueError, RuntimeError) as exc:
                names.add(f"unavailable ({exc})")
    return ",".join(sorted(names)) if names else None


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device, *, cache_enabled: bool = True):
    """Set TF32 flags for the block (restored on exit) and enter autocast for ``bf16``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError("precision='tf32' applies to CUDA devices only (use fp32 or bf16 on CPU)")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if device.type == "cuda" and precision != "default":
            tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_input(input_shape: Sequence[int], device: torch.device, channels_last: bool = False,
               seed: int = 0) -> torch.Tensor:
    """A reproducible input in [0, 1] of ``input_shape`` on ``device``."""
    if len(input_shape) != 4 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (batch, channels, height, width) of positive sizes, got "
                         f"{tuple(input_shape)}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: no host copy of 4K inputs
    x = torch.rand(*[int(s) for s in input_shape], generator=gen, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _prepare(model: nn.Module, device: torch.device, channels_last: bool, compile: bool | str) -> nn.Module:
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        mode = compile if isinstance(compile, str) else None
        model = torch.compile(model, mode=mode)
    return model


def _graph_forward(model: nn.Module, x: torch.Tensor, precision: str, device: torch.device, side_warmup: int = 3):
    """Capture one forward on a static input into a CUDA graph; returns (replay, static_out)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad(), precision_context(precision, device, cache_enabled=False):
        for _ in range(side_warmup):  # lazy initialisation (cuBLAS handles, autotuning) off the graph
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), precision_context(precision, device, cache_enabled=False), torch.cuda.graph(graph):
        static_out = model(static_x)
    return graph.replay, static_out


def run_info(model: nn.Module, device: torch.device, input_shape: Sequence[int]) -> dict[str, Any]:
    """The input's facts and the environment (``harness.profile.environment``) of one measurement."""
    env = environment(device)
    cuda = device.type == "cuda"
    return {
        "batch_size": int(input_shape[0]),
        "input_shape": "x".join(str(int(s)) for s in input_shape),
        "input_size": f"{int(input_shape[-2])}x{int(input_shape[-1])}",
        "pixels": int(input_shape[-2]) * int(input_shape[-1]),
        "device": str(device),
        "device_name": env["device"] if cuda else env["cpu"],
        **{k: env.get(k) if cuda else None for k in ("driver", "cuda", "cudnn")},
        **{k: env[k] for k in ("torch", "threads", "omp_wait_policy", "python", "cpu")},
        "scan_backend": scan_backends_of(model, device),
    }


def measure_latency(model: nn.Module | str, input_shape: Sequence[int], *, device: str | torch.device = "cpu",
                    precision: str = "fp32", channels_last: bool = False, compile: bool | str = False,
                    cuda_graphs: bool = False, warmup: int = 10, min_warmup_s: float = 1.0, repeats: int = 20,
                    max_warmup_s: float | None = 30.0, max_time_s: float | None = None,
                    cudnn_benchmark: bool | None = None, overrides: dict | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Time the inference forward of ``model`` on an input of ``input_shape`` (B, C, H, W).

    ``model``: a module (moved to ``device`` and put in eval mode, in place) or a preset name
    (built with ``overrides``). ``compile``: False, True or a torch.compile mode string.
    ``cuda_graphs``: capture one forward on a static input and time graph replays (CUDA only).
    ``cudnn_benchmark``: None leaves ``torch.backends.cudnn.benchmark`` as it is (recorded).
    ``max_time_s``: optional budget for the timed calls (at least 3 are made).

    Returns a dict: median_ms, p90_ms, min_ms, mean_ms, repeats, warmup_calls, warmup_s,
    first_call_ms (recorded, never part of the statistics), timer, wall_median_ms (CUDA),
    output_shape, the knobs (precision, autocast, tf32_matmul, tf32_cudnn, float32_matmul_precision,
    channels_last, compile, cuda_graphs, cudnn_benchmark) and the environment (see ``run_info``).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda_graphs and device.type != "cuda":
        raise ValueError("cuda_graphs=True needs a CUDA device")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    module, name = resolve_model(model, overrides)
    saved_benchmark = torch.backends.cudnn.benchmark
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    try:
        module = _prepare(module, device, channels_last, compile)
        x = make_input(input_shape, device, channels_last, seed)
        with precision_context(precision, device):
            flags = precision_flags("bfloat16" if precision == "bf16" else None)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def forward():
            with torch.no_grad(), precision_context(precision, device):
                return module(x)

        t0 = time.perf_counter()
        out = forward()  # the first call: lazy init, compilation, autotuning; never timed
        sync()
        first_call_ms = (time.perf_counter() - t0) * 1e3
        fn = forward
        if cuda_graphs:
            replay, out = _graph_forward(module, x, precision, device)
            fn = replay
        # The first call above counts towards the warm-up (still never timed); compiled models get
        # two more calls so that recompilation settles before the clock runs.
        stats = time_call(fn, device, warmup=max(warmup - 1, 2 if compile else 0),
                          min_warmup_s=max(0.0, min_warmup_s - first_call_ms / 1e3), repeats=repeats,
                          timer="cuda_event" if device.type == "cuda" else "wall", max_warmup_s=max_warmup_s,
                          max_time_s=max_time_s, return_times=True)
        times = stats.pop("times_ms")
        stats["warmup_calls"] += 1  # the untimed first call
        stats["warmup_s"] += first_call_ms / 1e3
        result: dict[str, Any] = {"model": name, **stats, "mean_ms": sum(times) / len(times),
                                  "first_call_ms": first_call_ms,
                                  "timer": "cuda_event" if device.type == "cuda" else "perf_counter",
                                  "output_shape": "x".join(str(s) for s in out.shape)}
        result.update({
            "precision": precision,
            "autocast": flags["autocast"],
            "tf32_matmul": flags["tf32_matmul"] if device.type == "cuda" else None,
            "tf32_cudnn": flags["tf32_cudnn"] if device.type == "cuda" else None,
            "float32_matmul_precision": flags["float32_matmul_precision"],
            "channels_last": bool(channels_last),
            "compile": compile if isinstance(compile, str) else bool(compile),
            "cuda_graphs": bool(cuda_graphs),
            "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            "warmup_rule": f">= {warmup} calls and >= {min_warmup_s} s (capped at {max_warmup_s} s)",
        })
        result.update(run_info(module, device, input_shape))
        return result
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
