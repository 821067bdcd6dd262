"""The compiled `cpp` selective scan against a plain float64 sequential reference."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch

from harness.ops import scan_cpp
from harness.ops.scan_reference import selective_scan_reference

if not scan_cpp.is_available():
    pytest.skip("the cpp selective scan could not be built", allow_module_level=True)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_NAMES = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")


@dataclass(frozen=True)
class Case:
    b: int
    d: int
    L: int
    n: int
    g: int
    softplus: bool
    has_D: bool
    has_bias: bool
    # "raw": N(0, 1) * 0.5 - 3 through softplus; "small": uniform [1e-3, 1e-1];
    # "large": uniform up to 2 (strong decay); "huge": uniform [5, 10], so that
    # delta * A leaves the fast exp's range and the clamped exp runs.
    delta: str = "raw"

    @property
    def id(self) -> str:
        flags = ("sp" if self.softplus else "nosp") + ("+D" if self.has_D else "")
        flags += "+bias" if self.has_bias else ""
        return f"b{self.b}-d{self.d}-L{self.L}-n{self.n}-g{self.g}-{flags}-{self.delta}"


CASES = [
    Case(1, 16, 1, 4, 8, True, True, True),  # L = 1
    Case(2, 16, 37, 16, 8, True, True, True),  # L prime, batch 2
    Case(1, 64, 101, 4, 8, False, False, False, "small"),
    Case(1, 16, 101, 1, 1, True, True, False),  # n = 1, g = 1
    Case(1, 16, 37, 16, 16, False, True, True, "large"),  # g = d
    Case(1, 64, 300, 16, 8, True, True, True),  # several chunks, partial last one
    Case(2, 24, 130, 10, 3, True, False, True, "large"),  # n not a vector multiple
    Case(1, 16, 70, 33, 2, True, True, True),  # n over two vectors
    Case(1, 16, 101, 16, 4, False, True, True, "huge"),
    Case(1, 160, 70, 4, 1, True, True, True),  # > 64 channels per backward task
]


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 inputs of realistic magnitudes, plus the output gradient dy."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    b, d, L, n, g = case.b, case.d, case.L, case.n, case.g
    if case.delta == "raw":
        delta = randn(b, d, L) * 0.5 - 3.0
    elif case.delta == "small":
        delta = 1e-3 + rand(b, d, L) * (1e-1 - 1e-3)
    elif case.delta == "large":
        delta = 1e-3 + rand(b, d, L) * 2.0
    else:
        delta = 5.0 + rand(b, d, L) * 5.0
    return {
        "u": randn(b, d, L),
        "delta": delta,
        # A in [-n, -1], like -exp(A_log) with A_log initialised to log(1..n).
        "A": -torch.exp(rand(d, n) * math.log(n)),
        "B": randn(b, g, n, L),
        "C": randn(b, g, n, L),
        "D": randn(d) if case.has_D else None,
        "delta_bias": randn(d) * 0.5 if case.has_bias else None,
        "dy": randn(b, d, L),
    }


@functools.lru_cache(maxsize=None)
def reference(case: Case) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """y and the gradients of sum(dy * y), all in float64 (cached per case)."""
    inputs = make_inputs(case)
    names = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None)
              for k, v in inputs.items() if k in names}
    y = selective_scan_reference(*(leaves[k] for k in names), case.softplus)
    present = [leaves[k] for k in names if leaves[k] is not None]
    grads = iter(torch.autograd.grad((y * inputs["dy"]).sum(), present))
    return y.detach(), tuple(next(grads) if leaves[k] is not None else None for k in names)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| (the absolute error where ref is exactly 0)."""
    diff = (ours.double() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def simd_variants() -> list[str]:
    """Every SIMD variant of the kernel this CPU can run."""
    order = ["base", "avx2", "avx512"]
    best = scan_cpp._ext().set_isa("best")
    return order[: order.index(best) + 1]


@pytest.fixture(params=simd_variants())
def simd(request: pytest.FixtureRequest) -> str:
    ext = scan_cpp._ext()
    ext.set_isa(request.param)
    yield request.param
    ext.set_isa("best")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case: Case, dtype: torch.dtype, simd: str) -> None:
    inputs = {k: (v.to(dtype) if v is not None else None) for k, v in make_inputs(case).items()}
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    y_ref, grads_ref = reference(case)
    tol = TOLERANCE[dtype]

    y = scan_cpp.forward(*args, case.softplus)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert relative_error(y, y_ref) <= tol, f"y: {relative_error(y, y_ref):.3g}"

    grads = scan_cpp.backward(*args, case.softplus, inputs["dy"])
    assert len(grads) == len(GRAD_NAMES)
    for name, ours, ref, arg in zip(GRAD_NAMES, grads, grads_ref, args):
        if arg is None:
            assert ours is None, name
            continue
        assert ours.dtype == dtype and ours.shape == arg.shape, name
        err = relative_error(ours, ref)
        assert err <= tol, f"{name}: {err:.3g}"


def test_noncontiguous_inputs_and_default_args() -> None:
    case = Case(1, 16, 50, 16, 4, True, False, False)
    inputs = make_inputs(case)
    # B and C as transposed views of (b, g, L, n) storage, u and delta as slices.
    B = inputs["B"].transpose(2, 3).contiguous().transpose(2, 3).float()
    C = inputs["C"].transpose(2, 3).contiguous().transpose(2, 3).float()
    u = torch.cat([inputs["u"], inputs["u"]], dim=-1).float()[..., : case.L]
    delta = inputs["delta"].float()
    assert not B.is_contiguous() and not u.is_contiguous()
    y = scan_cpp.forward(u, delta, inputs["A"].float(), B, C, delta_softplus=True)
    y_ref, _ = reference(case)
    assert relative_error(y, y_ref) <= TOLERANCE[torch.float32]


def test_bad_inputs_raise() -> None:
    inputs = make_inputs(Case(1, 16, 8, 4, 8, True, True, True))
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    with pytest.raises(RuntimeError):  # mixed dtypes
        scan_cpp.forward(u.float(), delta, A, B, C)
    with pytest.raises(RuntimeError):  # groups (3) do not divide dim (16)
        scan_cpp.forward(u, delta, A, B[:, :3], C[:, :3])
    with pytest.raises(RuntimeError):  # half precision is not supported
        scan_cpp.forward(u.half(), delta.half(), A.half(), B.half(), C.half())
