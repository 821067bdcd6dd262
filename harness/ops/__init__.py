"""Selective-scan operator (one interface, mamba_ssm's signature, interchangeable backends), scan
routes and the multi-route scan built on them. Nothing here imports ``harness.models``."""

from harness.ops.route_scan import ROUTE_MODES, multi_route_scan, route_mode, use_route_mode
from harness.ops.routes import ROUTE_SETS, resolve_directions, route_index, route_indices, route_order
from harness.ops.selective_scan import (
    ScanBackend,
    SelectiveScanFn,
    register_backend,
    resolve_backend,
    scan_backends,
    selective_scan,
    use_backend,
)

try:  # Triton backend; registers "triton" (unavailable without CUDA/Triton)
    from harness.ops import scan_triton  # noqa: F401
except Exception:  # noqa: BLE001 - an optional GPU path must never break CPU-only imports
    scan_triton = None

__all__ = [
    "ROUTE_MODES",
    "ROUTE_SETS",
    "ScanBackend",
    "SelectiveScanFn",
    "multi_route_scan",
    "register_backend",
    "resolve_backend",
    "resolve_directions",
    "route_index",
    "route_indices",
    "route_mode",
    "route_order",
    "scan_backends",
    "selective_scan",
    "use_backend",
    "use_route_mode",
]
