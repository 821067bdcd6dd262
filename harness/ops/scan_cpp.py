"""`cpp` backend of the selective scan: a compiled CPU kernel built on first use.

Semantics are those of mamba_ssm's ``selective_scan_fn`` (see
``csrc/selective_scan_cpu.cpp``). The extension is compiled with
``torch.utils.cpp_extension.load`` the first time it is needed and cached under
``$EABENCH_CACHE/torch_extensions`` (default ``~/.cache/eabench/torch_extensions``).
If the build fails, :func:`is_available` warns once and returns False so that a
dispatcher can fall back to another backend.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["is_available", "forward", "backward"]

_NAME = "eabench_selective_scan_cpu"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan_cpu.cpp"
# -fopenmp: at::parallel_for is a header template that only runs in parallel when the
#   extension itself is compiled with OpenMP (the runtime is torch's libgomp, already loaded).
# -ffp-contract=fast: fused multiply-adds (ISO -std=c++NN turns contraction off otherwise).
# -fno-trapping-math: lets gcc turn the exp's range clamps into SIMD selects (we never
#   enable FP exceptions). -fno-math-errno: no errno bookkeeping around scalar libm calls.
# No -ffast-math: it would fold away the exp's rounding trick ((x + 1.5 * 2^23) - ...) and
# NaN handling. No -march=native: the source compiles AVX2 and AVX-512 variants itself and
# picks one at run time (measured: -march=native gains nothing), so the cached build is
# portable across x86-64 machines. -Wno-psabi: silences notes about vector-argument ABI
# changes in always-inlined helpers (never called across an ABI boundary).
_CFLAGS = [
    "-O3",
    "-fopenmp",
    "-ffp-contract=fast",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-Wno-psabi",
]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None


def _build_directory() -> Path:
    """Cache folder for the build, keyed on the Python and torch versions and the source's path.

    The path is part of the key because ninja's build file names the source by path: two
    checkouts sharing one folder would each rebuild it under the other's lock in turn.
    """
    root = os.environ.get("EABENCH_CACHE") or os.path.join("~", ".cache", "eabench")
    checkout = hashlib.sha256(str(_SOURCE).encode()).hexdigest()[:10]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{checkout}"
    path = Path(root).expanduser() / "torch_extensions" / _NAME / tag.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _import_cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, without its import-time "No CUDA runtime" log line."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _load() -> ModuleType | None:
    """Build (or load the cached build of) the extension once per process."""
    global _tried, _module
    with _lock:
        if not _tried:
            _tried = True
            try:
                # load() serialises concurrent builds of one folder with a file baton and
                # rebuilds when the source or the flags change.
                _module = _import_cpp_extension().load(
                    name=_NAME,
                    sources=[str(_SOURCE)],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    build_directory=str(_build_directory()),
                    verbose=False,
                )
            except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
                warnings.warn(
                    f"eabench: the cpp selective scan could not be built "
                    f"({type(exc).__name__}); it is unavailable.\n{_tail(str(exc))}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _module = None
    return _module


def is_available() -> bool:
    """True if the compiled kernel could be built and loaded (tried once per process)."""
    return _load() is not None


def _ext() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError("eabench: the cpp selective scan is unavailable (build failed)")
    return module


def forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan forward on the CPU.

    Args:
        u, delta: (b, d, L). A: (d, n). B, C: (b, g, n, L) with g dividing d; channel c
            uses group c // (d // g). D, delta_bias: (d,) or None. All CPU tensors of one
            dtype, float32 or float64.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        y: (b, d, L), same dtype as u.
    """
    return _ext().fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus))


def backward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    dy: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Gradients of sum(dy * y) for the inputs of :func:`forward`.

    Returns:
        (du, ddelta, dA, dB, dC, dD, ddelta_bias), shaped like the inputs; ddelta is with
        respect to the raw delta (through delta_bias and the softplus); dD / ddelta_bias are
        None when D / delta_bias are None.
    """
    du, ddelta, dA, dB, dC, dD, dbias = _ext().bwd(
        u, delta, A, B, C, D, delta_bias, bool(delta_softplus), dy
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dbias if delta_bias is not None else None,
    )
