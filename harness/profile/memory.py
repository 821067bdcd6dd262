"""Peak memory of one inference forward pass (README.md, "Measurement protocols": latency and memory).

- CUDA (``method="cuda_max_memory_allocated"``): one untimed warm-up forward, then
  ``reset_peak_memory_stats`` -> forward -> ``max_memory_allocated``. ``peak_mb`` is the
  allocator's peak during the pass (weights and input included, the NTIRE convention);
  ``increase_mb`` is that peak minus what was allocated just before the pass.
- CPU (``method="subprocess_vmhwm"``): a FRESH Python process builds the model (from a preset
  name and overrides, or from a pickled module), runs one warm-up forward, returns freed memory
  to the OS (``malloc_trim``; glibc's mmap threshold is pinned so large tensors are unmapped on
  free), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), reads VmRSS, runs the
  measured forward and reads VmHWM. ``peak_mb`` = VmHWM − VmRSS before the pass: the resident
  memory the pass itself added (activations and workspaces; weights excluded);
  ``peak_rss_mb`` is the absolute high-water mark. Where the peak counter cannot be reset, the
  method says so (``subprocess_vmhwm_noreset``: the build's own peak may mask the pass's) and,
  off Linux, ``ru_maxrss`` is used (``subprocess_ru_maxrss``).
  A module that cannot be pickled is measured in this process instead (``inprocess_vmhwm``:
  not fresh; the method says so).

A pass that runs out of memory returns ``status="oom"`` (CUDA OOM, MemoryError, or the child
killed by SIGKILL, which is what the kernel's OOM killer sends); other failures raise.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

MB = 2**20


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (torch.OutOfMemoryError, MemoryError, allocator messages)."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg
    return False


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_forward(model: nn.Module, input_shape: Sequence[int], precision: str = "fp32",
                 channels_last: bool = False, warmup: bool = True, fresh: bool = True) -> dict[str, Any]:
    """Resident-memory peak of one forward of ``model`` in *this* process (the child's body)."""
    from harness.profile.latency import make_input, precision_context

    device = torch.device("cpu")
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = make_input(input_shape, device, channels_last)
    with torch.no_grad(), precision_context(precision, device):
        if warmup:
            model(x)  # first-call allocations (kernel caches, lazy modules) are not the pass's
        _trim_heap()
        if sys.platform.startswith("linux") and _read_status_kb("VmHWM") is not None:
            reset = _reset_peak_rss()
            before = _read_status_kb("VmRSS")
            hwm_before = _read_status_kb("VmHWM")
            out = model(x)
            peak = _read_status_kb("VmHWM")
            method = ("subprocess_vmhwm" if reset else "subprocess_vmhwm_noreset") if fresh else (
                "inprocess_vmhwm" if reset else "inprocess_vmhwm_noreset")
            base = before if reset else hwm_before
            increase_kb = max(0, peak - base)
        else:  # pragma: no cover - non-Linux
            import resource

            unit = 1 if sys.platform == "darwin" else 1024
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit // 1024
            out = model(x)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit // 1024
            increase_kb = max(0, peak - before)
            method = "subprocess_ru_maxrss" if fresh else "inprocess_ru_maxrss"
    return {"peak_mb": increase_kb / 1024, "peak_rss_mb": peak / 1024, "baseline_rss_mb": before / 1024,
            "method": method, "output_shape": "x".join(str(s) for s in out.shape), "status": "ok"}


def _child_main(argv: list[str] | None = None) -> None:
    """Entry point of the fresh measuring process: JSON spec in argv[1], JSON result on the last line."""
    spec = json.loads((argv or sys.argv)[1])
    torch.set_num_threads(int(spec["threads"]))
    try:
        if spec.get("pickle_path"):
            model = torch.load(spec["pickle_path"], map_location="cpu", weights_only=False)
        else:
            from harness.models import create

            model = create(spec["preset"], **spec.get("overrides", {}))
            if spec.get("checkpoint"):
                from harness.checkpoints import load_weights

                load_weights(model, spec["checkpoint"])
        result = _rss_forward(model, spec["input_shape"], spec.get("precision", "fp32"),
                              spec.get("channels_last", False), spec.get("warmup", True))
    except BaseException as exc:  # reported to the parent, which decides (OOM is a result)
        result = {"status": "oom" if is_oom(exc) else "error", "error": f"{type(exc).__name__}: {exc}"}
    print("EABENCH_RESULT " + json.dumps(result), flush=True)


_CHILD_CODE = "import sys; from harness.profile.memory import _child_main; _child_main(sys.argv)"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # A fixed mmap threshold sends large tensors to mmap and back to the OS on free, so RSS follows
    # the live tensors instead of glibc's cached arenas.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + env.get("PYTHONPATH", "").split(os.pathsep)))
    return env


def _child_exception(error: str) -> Exception:
    """Re-create the child's exception: same builtin type where possible, else RuntimeError."""
    import builtins

    name, _, message = error.partition(": ")
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message + " (in the memory-measuring subprocess)")
        except TypeError:
            pass
    return RuntimeError(f"{error} (in the memory-measuring subprocess)")


def _cpu_subprocess(spec: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _CHILD_CODE, json.dumps(spec)], capture_output=True, text=True,
                          env=_child_env(), timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("EABENCH_RESULT ")]
    if lines:
        return json.loads(lines[-1][len("EABENCH_RESULT "):])
    if proc.returncode in (-signal.SIGKILL, 137):
        return {"status": "oom", "error": "measuring process killed by SIGKILL (the kernel's OOM killer?)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"memory subprocess failed (exit {proc.returncode}): " + " | ".join(tail))


def _cuda_peak(model: nn.Module, input_shape: Sequence[int], device: torch.device, precision: str,
               channels_last: bool) -> dict[str, Any]:
    from harness.profile.latency import make_input, precision_context

    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = make_input(input_shape, device, channels_last)
    with torch.no_grad(), precision_context(precision, device):
        model(x)  # warm-up: cuDNN/cuBLAS workspaces and lazy init happen here
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = model(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
    shape = "x".join(str(s) for s in out.shape)
    del out, x
    return {"peak_mb": peak / MB, "increase_mb": (peak - before) / MB, "allocated_before_mb": before / MB,
            "peak_reserved_mb": reserved / MB, "method": "cuda_max_memory_allocated", "output_shape": shape,
            "status": "ok"}


def peak_memory(model: nn.Module | str, input_shape: Sequence[int], *, device: str | torch.device = "cpu",
                overrides: dict | None = None, precision: str = "fp32", channels_last: bool = False,
                checkpoint: str | Path | None = None, timeout_s: float | None = 1800,
                threads: int | None = None) -> dict[str, Any]:
    """Peak memory (MB, 2**20 bytes) of one inference forward; see the module docstring.

    ``model``: a preset name (built with ``overrides`` and optional ``checkpoint``; required for
    the fresh-process CPU route to be cheap) or a module (CPU: pickled to the child with
    ``torch.save``; if that fails it is measured in this process, and ``method`` says so).
    Returns ``peak_mb``, ``method``, ``status`` ("ok" | "oom"), ``device`` and route details.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if isinstance(model, str):
            from harness.models import create

            module = create(model, **(overrides or {}))
            if checkpoint:
                from harness.checkpoints import load_weights

                load_weights(module, checkpoint)
        else:
            module = model
        try:
            result = _cuda_peak(module, input_shape, device, precision, channels_last)
        except BaseException as exc:
            if not is_oom(exc):
                raise
            result = {"status": "oom", "method": "cuda_max_memory_allocated",
                      "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        finally:
            torch.cuda.empty_cache()
        result["device"] = str(device)
        return result
    if device.type != "cpu":
        raise ValueError(f"peak_memory supports cpu and cuda devices, got {device}")
    spec: dict[str, Any] = {"input_shape": [int(s) for s in input_shape], "precision": precision,
                            "channels_last": bool(channels_last), "threads": threads or torch.get_num_threads()}
    if isinstance(model, str):
        spec.update(preset=model, overrides=dict(overrides or {}),
                    checkpoint=str(checkpoint) if checkpoint else None)
        result = _cpu_subprocess(spec, timeout_s)
    else:
        if overrides or checkpoint:
            raise ValueError("overrides and checkpoint apply to preset names only")
        with tempfile.TemporaryDirectory(prefix="eabench_mem_") as tmp:
            path = Path(tmp) / "model.pt"
            try:
                torch.save(model, path)
                pickled = True
            except (pickle.PicklingError, AttributeError, TypeError):
                pickled = False
            if pickled:
                spec["pickle_path"] = str(path)
                result = _cpu_subprocess(spec, timeout_s)
                if result.get("status") == "error" and ("Can't get attribute" in result.get("error", "")
                                                        or "No module named" in result.get("error", "")):
                    pickled = False  # the class is not importable in a fresh process
            if not pickled:
                try:
                    result = _rss_forward(model, input_shape, precision, channels_last, fresh=False)
                except BaseException as exc:
                    if not is_oom(exc):
                        raise
                    result = {"status": "oom", "error": f"{type(exc).__name__}: {exc}"}
    if result.get("status") == "error":
        raise _child_exception(result.get("error", ""))
    result.setdefault("method", "subprocess_vmhwm")
    result["device"] = "cpu"
    return result
