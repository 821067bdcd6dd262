"""Selective-scan operator: one interface (mamba_ssm's signature), interchangeable backends."""

from harness.ops.selective_scan import (
    ScanBackend,
    SelectiveScanFn,
    register_backend,
    resolve_backend,
    scan_backends,
    selective_scan,
    use_backend,
)

try:  # Triton backend + fused routes; registers "triton" (unavailable without CUDA/Triton)
    from harness.ops import scan_triton  # noqa: F401
except Exception:  # noqa: BLE001 - an optional GPU path must never break CPU-only imports
    scan_triton = None

__all__ = [
    "ScanBackend",
    "SelectiveScanFn",
    "register_backend",
    "resolve_backend",
    "scan_backends",
    "selective_scan",
    "use_backend",
]
