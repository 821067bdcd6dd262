"""Every selective-scan backend equals the float64 sequential reference, forward and backward."""

import pytest
import torch

from harness.ops import scan_backends, selective_scan, use_backend
from harness.ops.scan_reference import selective_scan_reference

BACKENDS = [b for b in scan_backends() if b != "mamba_ssm"]

# (batch, channels, length, d_state, groups): L = 1, primes, g = 1 and g = 8, n = 1.
SHAPES = [(2, 16, 1, 4, 1), (2, 16, 37, 4, 8), (1, 16, 101, 16, 8), (2, 8, 300, 3, 2), (1, 4, 257, 1, 1)]


def make_inputs(b, d, L, n, g, dtype=torch.float64, big_delta=False):
    gen = torch.Generator().manual_seed(b * 1000 + d * 100 + L + n + g)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    u = r(b, d, L)
    delta = r(b, d, L) * 0.5 + (0.5 if big_delta else -3.0)  # softplus(-3) ~ 0.05, EAMamba's scale
    A = -torch.arange(1, n + 1, dtype=dtype).repeat(d, 1) * (0.5 + torch.rand(d, 1, generator=gen, dtype=dtype))
    return dict(u=u, delta=delta, A=A, B=r(b, g, n, L), C=r(b, g, n, L), D=r(d), z=r(b, d, L),
                delta_bias=r(d) * 0.3)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference_with_grads(inp, softplus, use_z, use_D):
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = selective_scan_reference(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                 leaves["D"] if use_D else None, leaves["delta_bias"], softplus)
    if use_z:
        y = y * torch.nn.functional.silu(leaves["z"])
    dy = torch.randn_like(y)
    names = [k for k in leaves if (k != "z" or use_z) and (k != "D" or use_D)]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], dy)
    return y.detach(), dy, dict(zip(names, grads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}L{}n{}g{}".format(*s))
@pytest.mark.parametrize("softplus,use_z,use_D", [(True, True, True), (False, False, False)])
def test_backend_matches_float64_reference(backend, shape, softplus, use_z, use_D):
    inp = make_inputs(*shape)
    if not softplus:  # raw delta must already be a positive step size
        inp["delta"] = inp["delta"].abs() * 0.05 + 1e-3
        inp["delta_bias"] = inp["delta_bias"].abs() * 0.01
    y_ref, dy, g_ref = reference_with_grads(inp, softplus, use_z, use_D)
    dtype = torch.float64 if backend == "reference" else torch.float32
    leaves = {k: v.to(dtype).requires_grad_() for k, v in inp.items()}
    y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                       D=leaves["D"] if use_D else None, z=leaves["z"] if use_z else None,
                       delta_bias=leaves["delta_bias"], delta_softplus=softplus, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert y.dtype == dtype
    assert rel_err(y, y_ref) <= tol
    y.backward(dy.to(dtype))
    for name, ref in g_ref.items():
        assert leaves[name].grad is not None, name
        assert rel_err(leaves[name].grad, ref) <= tol, (name, rel_err(leaves[name].grad, ref))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_float64_inputs_are_exact(backend):
    inp = make_inputs(1, 16, 64, 8, 4, big_delta=True)  # Δ up to ~2: strong decay
    y_ref = selective_scan_reference(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"],
                                     inp["delta_bias"], True)
    y = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"],
                       delta_bias=inp["delta_bias"], delta_softplus=True, backend=backend)
    assert rel_err(y, y_ref) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_no_overflow(backend):
    # Long L with EAMamba-scale decay: forms that exponentiate a cumulative log-sum overflow here.
    if backend == "reference":
        pytest.skip("the reference is the definition; too slow at this length")
    inp = make_inputs(1, 8, 20000, 16, 8, dtype=torch.float32, big_delta=True)
    y = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"],
                       delta_bias=inp["delta_bias"], delta_softplus=True, backend=backend)
    assert torch.isfinite(y).all()
    y_ref = selective_scan(*(inp[k].double() for k in ("u", "delta", "A", "B", "C")), D=inp["D"].double(),
                           delta_bias=inp["delta_bias"].double(), delta_softplus=True, backend="torch")
    assert rel_err(y, y_ref) <= 1e-5


def test_ungrouped_B_C_and_half_precision():
    inp = make_inputs(2, 8, 33, 4, 1, dtype=torch.float32)
    B3, C3 = inp["B"][:, 0], inp["C"][:, 0]  # (b, n, L): mamba_ssm's ungrouped form
    y3 = selective_scan(inp["u"], inp["delta"], inp["A"], B3, C3, D=inp["D"], delta_softplus=True, backend="torch")
    y4 = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], delta_softplus=True,
                        backend="torch")
    assert torch.equal(y3, y4)
    yh = selective_scan(inp["u"].bfloat16(), inp["delta"].bfloat16(), inp["A"], B3.bfloat16(), C3.bfloat16(),
                        D=inp["D"], delta_softplus=True, backend="torch")
    assert yh.dtype == torch.bfloat16
    assert rel_err(yh.float(), y3.double()) < 5e-2  # bf16 inputs: only the rounding of the inputs


def test_auto_and_override():
    assert "torch" in scan_backends() and "reference" in scan_backends()
    inp = make_inputs(1, 8, 20, 4, 2, dtype=torch.float32)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    y_auto = selective_scan(*args, delta_softplus=True)
    with use_backend("reference"):
        y_ref = selective_scan(*args, delta_softplus=True)
    assert rel_err(y_auto, y_ref.double()) <= 1e-5


@pytest.mark.parametrize("bad, message", [
    (dict(backend="nope"), "unknown scan backend"),
    (dict(B=torch.randn(1, 3, 4, 20)), "do not divide"),
    (dict(A=torch.randn(8, 5)), "B must be"),
    (dict(D=torch.randn(7)), "D must have shape"),
])
def test_bad_arguments_are_named(bad, message):
    inp = make_inputs(1, 8, 20, 4, 2, dtype=torch.float32)
    kwargs = dict(u=inp["u"], delta=inp["delta"], A=inp["A"], B=inp["B"], C=inp["C"])
    kwargs.update(bad)
    if "B" in bad:
        kwargs["C"] = bad["B"]
    with pytest.raises(ValueError, match=message):
        selective_scan(**kwargs)


def test_scan_is_one_opaque_autograd_node():
    inp = make_inputs(1, 8, 20, 4, 2, dtype=torch.float32)
    u = inp["u"].requires_grad_()
    y = selective_scan(u, inp["delta"], inp["A"], inp["B"], inp["C"], delta_softplus=True, backend="torch")
    assert type(y.grad_fn).__name__ == "SelectiveScanFnBackward"
