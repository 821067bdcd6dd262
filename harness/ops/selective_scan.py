"""One selective-scan interface, several interchangeable backends.

``selective_scan`` has the signature and semantics of mamba_ssm's ``selective_scan_fn``:

    Δ' = softplus(Δ + delta_bias) (softplus optional)
    x_t = exp(Δ'_t A) ⊙ x_{t-1} + Δ'_t B_t u_t,   y_t = C_t · x_t + D u_t,   out = y ⊙ silu(z)

with u, Δ, z: (b, d, L); A: (d, n) real; B, C: (b, n, L) or grouped (b, g, n, L) where channel
c uses group c // (d / g); D, delta_bias: (d,).

Backends (``scan_backends()`` lists those usable here):
- ``reference``: the sequential definition, any dtype (float64 for tests); slow.
- ``torch``: chunked exact form in plain PyTorch with a hand-written backward; any device.
- ``cpp``: compiled CPU kernel, built on first use and cached; falls back if it cannot build.
- ``mamba_ssm``: mamba_ssm's CUDA kernel, when that package is importable (CUDA tensors).
- ``triton``: registered by the GPU fast path when Triton and CUDA are present.
``auto`` picks the fastest backend usable for the tensors' device.

Every backend runs inside one autograd Function, ``SelectiveScanFn``, so the scan is a
single opaque node: tracers (fvcore) see ``prim::PythonOp.SelectiveScanFn`` and FLOP
counters can charge it the paper's formula instead of its internal arithmetic.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from harness.ops import scan_reference, scan_torch


@dataclass(frozen=True)
class ScanBackend:
    """A backend: forward(u, delta, A, B, C, D, delta_bias, softplus) -> y, and its backward."""

    name: str
    forward: Callable
    backward: Callable
    is_available: Callable[[], bool]
    supports: Callable[[torch.device], bool]


def _reference_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy):
    # The reference is differentiated by autograd itself: it is the definition, not a kernel.
    inputs = [t for t in (u, delta, A, B, C, D, delta_bias)]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    with torch.enable_grad():
        y = scan_reference.selective_scan_reference(*leaves, delta_softplus)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True))
    return tuple(next(grads) if t is not None else None for t in leaves)


_BACKENDS: dict[str, ScanBackend] = {}
_AUTO_ORDER = {"cuda": ("triton", "mamba_ssm", "torch"), "cpu": ("cpp", "torch")}


def register_backend(backend: ScanBackend) -> None:
    """Add (or replace) a backend; later issues register ``triton`` here."""
    _BACKENDS[backend.name] = backend


register_backend(ScanBackend(
    "reference", lambda *a: scan_reference.selective_scan_reference(*a), _reference_backward,
    lambda: True, lambda device: True,
))
register_backend(ScanBackend(
    "torch", scan_torch.forward, scan_torch.backward, lambda: True, lambda device: True,
))


def _cpp_module():
    from harness.ops import scan_cpp  # imported lazily: it may compile on first use

    return scan_cpp


def _cpp_available() -> bool:
    try:
        return _cpp_module().is_available()
    except ImportError:
        return False


register_backend(ScanBackend(
    "cpp",
    lambda *a: _cpp_module().forward(*a),
    lambda *a: _cpp_module().backward(*a),
    _cpp_available,
    lambda device: device.type == "cpu",
))

_MAMBA_SSM_AVAILABLE = importlib.util.find_spec("mamba_ssm") is not None


def _mamba_ssm_not_dispatched(*args):
    raise RuntimeError("the mamba_ssm backend is called directly, not through SelectiveScanFn")


register_backend(ScanBackend(
    "mamba_ssm", _mamba_ssm_not_dispatched, _mamba_ssm_not_dispatched,
    lambda: _MAMBA_SSM_AVAILABLE, lambda device: device.type == "cuda",
))

def _shape_only_backward(*args):
    raise RuntimeError("the shape_only scan backend is for FLOP counting; it has no gradient")


# Returns zeros of the right shape without scanning: FLOP counters trace the model with it,
# so counting at 4K does not run the recurrence (its cost comes from the formula instead).
register_backend(ScanBackend(
    "shape_only", lambda u, *rest: torch.zeros_like(u), _shape_only_backward,
    lambda: True, lambda device: True,
))

_state = threading.local()


def scan_backends() -> list[str]:
    """Names of the backends usable on this machine (the cpp backend may compile here)."""
    return [name for name, b in _BACKENDS.items() if b.is_available() and name != "shape_only"]


@contextlib.contextmanager
def use_backend(name: str):
    """Make ``backend="auto"`` resolve to ``name`` inside the block (e.g. to compare models)."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; known: {sorted(_BACKENDS)} or 'auto'")
    previous = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = previous


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend ``name`` stands for on ``device``; errors name the valid choices."""
    if name == "auto":
        name = getattr(_state, "override", None) or "auto"
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            b = _BACKENDS.get(candidate)
            if b is not None and b.supports(device) and b.is_available():
                return candidate
        return "torch"
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown scan backend {name!r}; known: {sorted(_BACKENDS)} or 'auto'")
    if not backend.supports(device):
        raise ValueError(f"scan backend {name!r} does not run on {device.type} tensors")
    if not backend.is_available():
        raise RuntimeError(f"scan backend {name!r} is not available here; usable: {scan_backends()}")
    return name


class SelectiveScanFn(torch.autograd.Function):
    """The whole scan (including the optional z gate) as one autograd node."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
        impl = _BACKENDS[backend]
        y = impl.forward(u, delta, A, B, C, D, delta_bias, delta_softplus)
        out = y * F.silu(z) if z is not None else y
        ctx.backend = backend
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y if z is not None else None)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, y = ctx.saved_tensors
        dz = None
        if z is not None:
            sig = torch.sigmoid(z)
            dz = dout * y * sig * (1 + z * (1 - sig))  # d silu(z)/dz = σ(z)(1 + z(1 − σ(z)))
            dout = dout * z * sig
        grads = _BACKENDS[ctx.backend].backward(
            u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, dout.contiguous()
        )
        du, ddelta, dA, dB, dC, dD, ddelta_bias = grads
        return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, None


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, channels, length), got {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} must match u {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (channels={d}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() != 4 or M.shape[0] != b or M.shape[2] != n or M.shape[3] != L:
            raise ValueError(
                f"selective_scan: {name} must be (batch={b}, d_state={n}, L={L}) or grouped "
                f"(batch, groups, d_state, L); got {tuple(M.shape)}"
            )
        if d % M.shape[1]:
            raise ValueError(f"selective_scan: {name} has {M.shape[1]} groups, which do not divide {d} channels")
    if B.shape != C.shape:
        raise ValueError(f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must have the same shape")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (d,):
            raise ValueError(f"selective_scan: {name} must have shape ({d},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z {tuple(z.shape)} must match u {tuple(u.shape)}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """mamba_ssm's ``selective_scan_fn`` on any backend; returns (b, d, L) in u's dtype."""
    grouped = B.dim() == 4
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    if name == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B if grouped else B[:, 0], C if grouped else C[:, 0],
                                 D, z, delta_bias, delta_softplus)
    out_dtype = u.dtype
    # Half-precision inputs are scanned in float32, as mamba_ssm's kernels do.
    work = torch.float64 if u.dtype == torch.float64 else torch.float32

    def prep(t):
        return None if t is None else t.to(work).contiguous()

    out = SelectiveScanFn.apply(
        prep(u), prep(delta), prep(A), prep(B), prep(C), prep(D), prep(z), prep(delta_bias),
        bool(delta_softplus), name,
    )
    return out.to(out_dtype)
