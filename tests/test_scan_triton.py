"""The Triton selective scan and fused multi-route scan, run on CPU by Triton's interpreter.

The kernels' logic (segments, carries, reverse adjoint, gradients, route indices, atomic add
merge) is checked against the float64 sequential reference at small, awkward sizes. The
interpreter must be switched on before Triton is imported, so the checks run in one child
process with ``TRITON_INTERPRET=1``; it prints one JSON line of relative errors, which the
tests below read. On a GPU the same kernels are checked by ``harness.bench.gpu_eamamba``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FP32_TOL = 1e-5
FP64_TOL = 1e-12

# (batch, channels, L, d_state, groups, overrides): L = 1, primes, g = 1 and g = 8 (one channel
# per group), n = 16 with two channel blocks per group (partial dB/dC sums), several segments.
SCAN_CASES = {
    "L1_g1": ((2, 4, 1, 4, 1), {}),
    "L37_g8_segments": ((1, 8, 37, 4, 8), dict(block_t=8, seg_tiles=1)),
    "L53_n16_two_blocks": ((1, 16, 53, 16, 2), dict(block_d=4, block_t=8, seg_tiles=2)),
    "L29_n3_g1_default": ((2, 4, 29, 3, 1), {}),
    "per_channel_one_segment": ((1, 4, 23, 2, 2), dict(block_d=1, block_t=8, seg_tiles=99)),
    # the step-sequential forward kernel (segments of 5 or 7 steps, 4-step unroll with a tail)
    "step_L37_g8_segments": ((1, 8, 37, 4, 8), dict(step_seg_len=5, block_t=8, seg_tiles=1)),
    "step_L53_n16_blocks_of_4": ((1, 16, 53, 16, 2), dict(step_seg_len=7, step_block_d=4, block_t=16)),
    # step backward: blocks holding 2 groups of 4 channels, the last block half empty
    "step_L41_groups_in_block_partial": ((2, 12, 41, 4, 3), dict(step_seg_len=5, step_block_d=8)),
    "step_L30_one_segment": ((1, 8, 30, 3, 2), dict(step_seg_len=64)),
}


def _rel(ours, ref) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (ours.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def _scan_inputs(b, d, L, n, g):
    """float64 inputs at EAMamba's scales (softplus(Δ) ≈ 0.05, A = -(1..n) · random)."""
    import torch

    gen = torch.Generator().manual_seed(b * 1000 + d * 100 + L + n + g)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    A = -torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1) * (0.5 + torch.rand(d, 1, generator=gen,
                                                                                       dtype=torch.float64))
    inp = dict(u=r(b, d, L), delta=r(b, d, L) * 0.5 - 3.0, A=A, B=r(b, g, n, L), C=r(b, g, n, L), D=r(d),
               delta_bias=r(d) * 0.3)
    return inp


def _check_scan(shape, overrides, dtype_name="float32", softplus=True):
    """Max relative error of y and of every gradient, kernel (dtype) vs float64 reference."""
    import torch

    from harness.ops import scan_triton_launch as launch
    from harness.ops.scan_reference import selective_scan_reference

    dtype = getattr(torch, dtype_name)
    inp = _scan_inputs(*shape)
    if not softplus:
        inp["delta"] = inp["delta"].abs() * 0.05 + 1e-3
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = selective_scan_reference(*(leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")), softplus)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    args = [inp[k].to(dtype).contiguous() for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    overrides = dict(overrides)
    step = {k[len("step_"):]: overrides.pop(k) for k in list(overrides) if k.startswith("step_")}
    if step:
        y2 = launch.forward_step(*args, softplus, **step)
        g2 = launch.backward_step(*args, softplus, dy.to(dtype), **step)
    else:  # overrides select the tile kernels
        y2 = launch.forward(*args, softplus, **overrides)
        g2 = launch.backward(*args, softplus, dy.to(dtype), **overrides)
    errs = {"y": _rel(y2, y.detach())}
    for name, ours, ref in zip(leaves, g2, grads):
        errs["d" + name] = _rel(ours, ref)
    return errs


def _check_dispatcher():
    """selective_scan(backend='triton') with the z gate and ungrouped B/C, vs the reference."""
    import torch

    from harness.ops import scan_backends, scan_triton, selective_scan  # noqa: F401 (registers triton)

    inp = _scan_inputs(1, 8, 19, 4, 1)
    z = torch.randn(1, 8, 19, dtype=torch.float64)
    out = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaves = {k: v.detach().to(dtype).clone().requires_grad_() for k, v in inp.items()}
        zz = z.detach().to(dtype).clone().requires_grad_()
        y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"][:, 0], leaves["C"][:, 0],
                           D=leaves["D"], z=zz, delta_bias=leaves["delta_bias"], delta_softplus=True,
                           backend=backend)
        y.backward(torch.ones_like(y))
        out[backend] = [y.detach()] + [leaves[k].grad for k in leaves] + [zz.grad]
    errs = {f"t{i}": _rel(a, b) for i, (a, b) in enumerate(zip(out["triton"], out["reference"]))}
    errs["listed"] = 0.0 if "triton" in scan_backends() else 1.0
    return errs


def _check_fused(routes, merge, heads, dim, h, w, d_state=4, dt_rank=2, kernel="tile", channels_last=False):
    """The fused multi-route scan (float32, forward and backward ``kernel``, x optionally a
    channels_last map) vs the materialised one on the reference backend (float64)."""
    import torch

    from harness.models.eamamba import init_ssm_parameters
    from harness.ops import multi_route_scan, resolve_directions, use_route_mode
    from harness.ops.scan_triton_launch import scan_settings

    torch.manual_seed(heads * 100 + dim + h * w)
    names = resolve_directions(routes)
    head_routes = tuple(names[i % len(names)] for i in range(heads))
    d = dim if merge == "add" else dim // heads
    params = init_ssm_parameters(heads, d, dt_rank, d_state)
    params["Ds"] = torch.randn(heads * d)  # not all ones: D's gradient is then informative
    params["A_logs"] = params["A_logs"] + 0.1 * torch.randn_like(params["A_logs"])
    x = torch.randn(2, dim, h, w)
    order = ["x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]
    results = {}
    for kind, dtype in (("reference", torch.float64), ("fused", torch.float32)):
        xx = x.detach().to(dtype).clone().requires_grad_()
        ps = [params[k].detach().to(dtype).clone().requires_grad_() for k in order]
        if kind == "fused":
            # the forward kernel's family runs the backward too
            with scan_settings(forward_kernel=kernel, backward_kernel=kernel), use_route_mode("fused"):
                xin = xx.contiguous(memory_format=torch.channels_last) if channels_last else xx
                y = multi_route_scan(xin, head_routes, merge, *ps, backend="triton")
                gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(dtype)
                y.backward(gy)
        else:
            with use_route_mode("materialised"):
                y = multi_route_scan(xx, head_routes, merge, *ps, backend="reference")
            gy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(dtype)
            y.backward(gy)
        results[kind] = [y.detach(), xx.grad] + [p.grad for p in ps]
    labels = ["y", "dx"] + ["d" + k for k in order]
    return {lab: _rel(a, b) for lab, a, b in zip(labels, results["fused"], results["reference"])}


def _check_step_channels_last():
    """The step kernel on channels-last views (the layout the fused path gives it), writing y
    into a channels-last ``out``: several segments, a block of 4 channels over 2 groups."""
    import torch

    from harness.ops import scan_triton_launch as launch
    from harness.ops.scan_reference import selective_scan_reference

    inp = _scan_inputs(2, 8, 41, 4, 2)
    y = selective_scan_reference(*(inp[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")), True)
    f = {k: v.float() for k, v in inp.items()}
    cl3 = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  (b, L, c) memory
    cl4 = lambda t: t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # noqa: E731  (b, L, g, n) memory
    out = torch.empty(2, 41, 8).transpose(1, 2)
    y2 = launch.forward_step(cl3(f["u"]), cl3(f["delta"]), f["A"], cl4(f["B"]), cl4(f["C"]), f["D"],
                             f["delta_bias"], True, seg_len=6, block_d=4, out=out)
    return {"y": _rel(y2, y), "wrote_out": 0.0 if y2.data_ptr() == out.data_ptr() else 1.0}


def _check_channel_norm(bias_free: bool, channels_last: bool):
    """harness.ops.norm_triton's kernels (float32) vs the elementary-op ChannelLayerNorm in
    float64: output and the gradients of x, weight, bias. 12 channels (padded to 16), 7×9 pixels
    (a partial pixel block), batch 2."""
    import torch

    from harness.models.layers import ChannelLayerNorm
    from harness.ops import norm_triton

    torch.manual_seed(11)
    x = torch.randn(2, 12, 7, 9, dtype=torch.float64) * 3 + 1
    gy = torch.randn_like(x)
    ref = ChannelLayerNorm(12, "BiasFree" if bias_free else "WithBias", fast_path=False).double()
    with torch.no_grad():
        ref.body.weight.copy_(torch.randn(12))
        if not bias_free:
            ref.body.bias.copy_(torch.randn(12))
    ours = ChannelLayerNorm(12, "BiasFree" if bias_free else "WithBias", fast_path=True).float()
    ours.load_state_dict(ref.state_dict())
    results = {}
    for kind, mod, dtype in (("ref", ref, torch.float64), ("ours", ours, torch.float32)):
        xx = x.to(dtype).clone()
        if channels_last:
            xx = xx.contiguous(memory_format=torch.channels_last)
        xx.requires_grad_()
        y = mod.forward_fast(xx) if kind == "ours" else mod(xx)
        y.backward(gy.to(dtype))
        results[kind] = [y.detach(), xx.grad] + [p.grad for p in mod.parameters()]
    errs = {lab: _rel(a, b) for lab, a, b in zip(["y", "dx", "dw", "db"], results["ours"], results["ref"])}
    errs["kept_format"] = 0.0 if results["ours"][0].is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format) else 1.0
    # with the silu gate fused in (the kernels' GATE path), against norm(x) · silu(z) in float64
    z = torch.randn_like(x)
    gated = {}
    for kind, mod, dtype in (("ref", ref, torch.float64), ("ours", ours, torch.float32)):
        mod.zero_grad(set_to_none=True)
        xx, zz = (t.detach().to(dtype).clone().requires_grad_() for t in (x, z))
        if kind == "ref":
            y = mod(xx) * torch.nn.functional.silu(zz)
        else:
            y = norm_triton._ChannelLayerNorm.apply(xx, mod.body.weight, getattr(mod.body, "bias", None), zz, 1e-5)
        y.backward(gy.to(dtype))
        gated[kind] = [y.detach(), xx.grad, zz.grad] + [p.grad for p in mod.parameters()]
    errs |= {"gate_" + lab: _rel(a, b) for lab, a, b in zip(["y", "dx", "dz", "dw", "db"], gated["ours"], gated["ref"])}
    return errs


def _check_block_fused():
    """A whole MambaFormerBlock on the fused path (split input projection, channels-last output
    view, Triton norms) against the same block on the float64 reference scan: output and all
    gradients; then, without gradients, that the cached projection weights follow an in-place
    weight update."""
    import copy

    import torch

    from harness.models.eamamba import MambaFormerBlock
    from harness.ops import route_scan, use_backend

    torch.manual_seed(4)
    ref = MambaFormerBlock(16, mixer="simple", d_state=4, directions="all_around").double()
    ours = MambaFormerBlock(16, mixer="simple", d_state=4, directions="all_around").float()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    gy = torch.randn_like(x)
    res = {}
    for kind, mod, dtype, backend in (("ref", ref, torch.float64, "reference"), ("ours", ours, torch.float32, "triton")):
        xx = x.detach().to(dtype).clone().requires_grad_()
        with use_backend(backend):
            assert route_scan.uses_fused_path(xx) == (kind == "ours")
            y = mod(xx)
        y.backward(gy.to(dtype))
        res[kind] = [y.detach(), xx.grad] + [p.grad for p in mod.parameters()]
    errs = {f"t{i}": _rel(a, b) for i, (a, b) in enumerate(zip(res["ours"], res["ref"]))}
    with torch.no_grad(), use_backend("triton"):
        y1 = ours(x.float())
        ours.mamba.x_proj_weight.mul_(0.5)
        ref.mamba.x_proj_weight.mul_(0.5)
        y2 = ours(x.float())
    with use_backend("reference"):
        y2_ref = ref(x)
    errs["after_update"] = _rel(y2, y2_ref)
    errs["changed"] = 0.0 if _rel(y2, y1) > 1e-4 else 1.0
    # a second block (other weights, same shapes and version counters) gets its own matrices
    other = MambaFormerBlock(16, mixer="simple", d_state=4, directions="all_around").float()
    other_ref = copy.deepcopy(other).double()
    with torch.no_grad(), use_backend("triton"):
        y3 = other(x.float())
    with torch.no_grad(), use_backend("reference"):
        errs["second_block"] = _rel(y3, other_ref(x))
    return errs


def _check_assoc_scan_path():
    """The GPU path's tl.associative_scan (forward and reverse) on a tiny tile."""
    from harness.ops.scan_triton_launch import scan_settings

    with scan_settings(assoc_scan_in_interpreter=True):
        return _check_scan((1, 2, 11, 2, 1), dict(block_t=4, seg_tiles=1))


def run_checks(which: list[str]) -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = {}
    for name in which:
        if name in SCAN_CASES:
            shape, ov = SCAN_CASES[name]
            out[name] = _check_scan(shape, ov)
        elif name == "no_softplus_fp64":
            out[name] = _check_scan((1, 4, 21, 3, 2), dict(block_t=8, seg_tiles=1), "float64", softplus=False)
        elif name == "dispatcher":
            out[name] = _check_dispatcher()
        elif name == "fused_concat_all_around_5x7":
            out[name] = _check_fused("all_around", "concat", 8, 16, 5, 7)
        elif name == "fused_concat_16heads_4x6":
            out[name] = _check_fused("cross", "concat", 16, 16, 4, 6)
        elif name == "fused_add_cross_5x7":
            out[name] = _check_fused("cross", "add", 4, 4, 5, 7)
        elif name == "fused_step_concat_all_around_5x7_channels_last":
            out[name] = _check_fused("all_around", "concat", 8, 16, 5, 7, kernel="step", channels_last=True)
        elif name == "fused_step_add_cross_5x7":
            out[name] = _check_fused("cross", "add", 4, 4, 5, 7, kernel="step")
        elif name == "step_channels_last_views":
            out[name] = _check_step_channels_last()
        elif name == "block_fused":
            out[name] = _check_block_fused()
        elif name.startswith("channel_norm_"):
            out[name] = _check_channel_norm("bias_free" in name, "channels_last" in name)
        elif name == "assoc_scan_path":
            out[name] = _check_assoc_scan_path()
        else:
            raise KeyError(name)
    return out


FAST = list(SCAN_CASES) + ["no_softplus_fp64", "dispatcher", "fused_concat_all_around_5x7", "fused_add_cross_5x7",
                           "fused_step_concat_all_around_5x7_channels_last", "fused_step_add_cross_5x7",
                           "step_channels_last_views", "channel_norm_with_bias",
                           "channel_norm_bias_free_channels_last", "block_fused"]
SLOW = ["fused_concat_16heads_4x6", "assoc_scan_path"]


def _run_in_interpreter(which: list[str]) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, *which], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter checks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fast_results():
    return _run_in_interpreter(FAST)


def _tolerance(case: str) -> float:
    return FP64_TOL if "fp64" in case else FP32_TOL


@pytest.mark.parametrize("case", FAST)
def test_interpreted_kernels_match_float64_reference(fast_results, case):
    errs = fast_results[case]
    bad = {k: v for k, v in errs.items() if not v <= _tolerance(case)}  # NaN fails too
    assert not bad, (case, errs)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW)
def test_interpreted_kernels_slow_cases(case):
    errs = _run_in_interpreter([case])[case]
    bad = {k: v for k, v in errs.items() if not v <= FP32_TOL}
    assert not bad, (case, errs)


def test_backend_reports_unavailable_without_gpu_or_interpreter():
    # In this (non-interpreted) process the backend must not claim CPU tensors.
    pytest.importorskip("triton")
    import torch

    from harness.ops import scan_triton

    if scan_triton.INTERPRET:
        pytest.skip("this process runs the interpreter")
    assert not scan_triton.supports(torch.device("cpu"))
    assert scan_triton.is_available() == torch.cuda.is_available()


def test_sixteen_byte_state_loads_only_where_they_are_valid():
    """The step kernels read B and C four states at a time only for float32, N a power of two
    >= 4 and 16-byte aligned (batch, group, position) rows; the interpreter checks run both ways."""
    pytest.importorskip("triton")
    import torch

    from harness.ops import scan_triton_launch

    def bc(n, dtype=torch.float32, offset=0, g=2, L=5):
        flat = torch.zeros(offset + 2 * L * g * n, dtype=dtype)[offset:]
        return flat.view(2, L, g, n).permute(0, 2, 3, 1)  # (b, g, n, L) over (b, L, g, n) memory

    assert scan_triton_launch.vector_states(bc(16), bc(16), 16)
    assert scan_triton_launch.vector_states(bc(4), bc(4), 4)
    assert not scan_triton_launch.vector_states(bc(3), bc(3), 3)  # a state mask
    assert not scan_triton_launch.vector_states(bc(12), bc(12), 12)  # not a power of two: a state mask
    assert not scan_triton_launch.vector_states(bc(16, torch.float64), bc(16, torch.float64), 16)
    assert not scan_triton_launch.vector_states(bc(16), bc(16, offset=1), 16)  # C's rows 4 bytes off
    odd_rows = torch.zeros(2, 5, 2, 18)[..., :16].permute(0, 2, 3, 1)  # row stride 18 floats
    assert not scan_triton_launch.vector_states(odd_rows, odd_rows, 16)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_checks(sys.argv[1:])))
