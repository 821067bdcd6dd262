"""What a run or a measurement executed on and with: the one environment recorder of the harness.

``environment(device)`` is stored with every run record (``harness.runner``), every profile job
(``harness.profile_job``), every ladder row set (``harness.profile.ladder``) and printed by the
benchmark scripts. ``precision_flags()`` are the float32 settings in force at the moment it is
called (TF32 for matmuls and cuDNN, ``float32_matmul_precision``, autocast), so a record's
"fp32" says which fp32 it was.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from harness.hardware import available_cores, wait_policy


@lru_cache(maxsize=1)
def nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` (None when there is no such tool)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def git_commit() -> str | None:
    """The checked-out commit of this source tree (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@lru_cache(maxsize=1)
def cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def precision_flags(autocast: str | None = None) -> dict[str, Any]:
    """The float32 settings in force now (call it inside the block being measured).

    ``autocast``: the autocast dtype the caller runs under (None: no autocast).
    """
    return {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "autocast": autocast}


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Hardware, software and settings behind a figure or a run record.

    Always: device (``"cpu"`` or the GPU's name), cpu, cpu_count, available_cores, threads,
    interop_threads, omp_wait_policy, torch, python, numpy, os, hostname, platform, git_commit
    and the precision flags (``precision_flags``). With CUDA: gpu, gpu_count, gpu_memory_gb,
    sms, cuda, cudnn, driver, triton. ``device`` picks which GPU is described (default: the
    current one).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    env: dict[str, Any] = {
        "device": device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "available_cores": available_cores(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "omp_wait_policy": wait_policy(), "torch": torch.__version__, "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}", "hostname": socket.gethostname(),
        "platform": platform.platform(), "git_commit": git_commit(),
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    env.update(precision_flags())
    if torch.cuda.is_available():
        index = device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   sms=props.multi_processor_count, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   driver=nvidia_driver())
        if device.type == "cuda":
            env["device"] = props.name
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def hardware_caption(env: dict[str, Any], device: torch.device | str = "cpu") -> str:
    """One line naming the hardware and software behind a figure."""
    device = torch.device(device)
    if device.type == "cuda" and env.get("gpu"):
        hw = f"{env['gpu']} (driver {env.get('driver') or '?'}, CUDA {env.get('cuda', '?')})"
    else:
        hw = f"{env['cpu']}, {env['threads']} threads"
    return f"{hw}; torch {env['torch']}, Python {env['python']}"
