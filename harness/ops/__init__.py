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

__all__ = [
    "ScanBackend",
    "SelectiveScanFn",
    "register_backend",
    "resolve_backend",
    "scan_backends",
    "selective_scan",
    "use_backend",
]
