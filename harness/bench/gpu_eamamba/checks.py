"""Phase 1: the Triton scan, the fused multi-route scan and the whole model against float64 references."""

from __future__ import annotations

import copy
import json
import traceback

import torch
import torch.nn.functional as F

from harness.bench.gpu_eamamba.paths import CHECK_TOL_MODEL, fail_text, memory_format, path_settings, rel
from harness.models.eamamba import init_ssm_parameters
from harness.ops import ROUTE_SETS, multi_route_scan, selective_scan, use_route_mode
from harness.ops.scan_triton_launch import scan_settings


def scan_case(b, d, L, n, g, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    A = -torch.arange(1, n + 1, dtype=torch.float64).repeat(d, 1) * (0.5 + torch.rand(d, 1, generator=gen,
                                                                                       dtype=torch.float64))
    inp = dict(u=r(b, d, L), delta=r(b, d, L) * 0.5 - 3.0, A=A, B=r(b, g, n, L), C=r(b, g, n, L), D=r(d),
               z=r(b, d, L), delta_bias=r(d) * 0.3)
    return {k: v.to(device) for k, v in inp.items()}


def check_scan(shape, device) -> dict:
    """Triton (fp32) vs torch backend (float64): y and every gradient, via the dispatcher."""
    inp = scan_case(*shape, device=device, seed=sum(shape))
    out = {}
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        leaves = {k: v.detach().to(dtype).clone().requires_grad_() for k, v in inp.items()}
        y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                           z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True, backend=backend)
        gen = torch.Generator(device="cpu").manual_seed(1)
        y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
        out[backend] = {"y": y.detach(), **{"d" + k: v.grad for k, v in leaves.items()}}
    return {k: rel(out["triton"][k], out["torch"][k]) for k in out["torch"]}


def check_fused(routes, merge, heads, dim, h, w, device, b=2, d_state=16, dt_rank=4) -> dict:
    torch.manual_seed(heads + dim + h)
    names = ROUTE_SETS.get(routes, (routes,))
    head_routes = tuple(names[i % len(names)] for i in range(heads))
    d = dim if merge == "add" else dim // heads
    params = init_ssm_parameters(heads, d, dt_rank, d_state)
    params["Ds"] = torch.randn(heads * d)
    order = ["x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]
    x = torch.randn(b, dim, h, w)
    res = {}
    for kind, dtype in (("torch", torch.float64), ("fused", torch.float32)):
        xx = x.to(device=device, dtype=dtype).requires_grad_()
        ps = [params[k].to(device=device, dtype=dtype).requires_grad_() for k in order]
        mode, backend = ("fused", "triton") if kind == "fused" else ("materialised", "torch")
        with use_route_mode(mode):
            y = multi_route_scan(xx, head_routes, merge, *ps, backend=backend)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        y.backward(gy.to(device=device, dtype=dtype))
        res[kind] = [y.detach(), xx.grad] + [p.grad for p in ps]
    labels = ["y", "dx"] + ["d" + k for k in order]
    return {lab: rel(a, c) for lab, a, c in zip(labels, res["fused"], res["torch"])}


def model_outputs_and_grads(model, x, target, path, device, dtype=torch.float32):
    m = copy.deepcopy(model).to(device=device, dtype=dtype).train().to(memory_format=memory_format(path))
    with path_settings(path):
        out = m(x.to(dtype).contiguous(memory_format=memory_format(path)))
        loss = F.l1_loss(out, target.to(dtype))
        loss.backward()
        with torch.no_grad():  # the inference-only paths (mm projections, cached weights)
            out_no_grad = m(x.to(dtype).contiguous(memory_format=memory_format(path)))
    grads = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    return out.detach(), grads, out_no_grad


def phase_checks(args, device, model, log) -> list[dict]:
    rows = []
    shapes = [(2, 4, 1, 4, 1), (1, 8, 37, 4, 8), (2, 16, 1009, 16, 8), (1, 64, 4093, 16, 8),
              (1, 64, 65536, 16, 8), (2, 128, 4096, 16, 8), (1, 512, 1024, 16, 8), (1, 24, 3001, 3, 3)]
    # (the first two: also in the CPU interpreter tests; every size is a run-time value, so the
    # model's (d_state 16, 8 channels per block) variant is shared by most of these)
    if device.type != "cuda":
        shapes = shapes[:2]
    fused_cases = [("all_around", "concat", 8, 64, 48, 40), ("cross", "add", 4, 16, 24, 20),
                   ("all_around", "concat", 16, 32, 17, 13)]
    if device.type != "cuda":
        fused_cases = [("all_around", "concat", 8, 16, 5, 7)]
    checks = [(f"scan ({{}} kernels) b{s[0]} d{s[1]} L{s[2]} n{s[3]} g{s[4]}", lambda s=s: check_scan(s, device))
              for s in shapes]
    checks += [(f"fused ({{}} kernels) {c[1]} {c[0]} heads{c[2]} D{c[3]} {c[4]}x{c[5]}",
                lambda c=c: check_fused(*c, device=device)) for c in fused_cases]
    for kernel in ("tile", "step"):  # every check under each kernel family (forward and backward)
        for label, check in checks:
            row = dict(check=label.format(kernel), max_rel=float("nan"), tol=1e-5)
            try:
                with scan_settings(forward_kernel=kernel, backward_kernel=kernel):
                    errs = check()
                row.update(max_rel=max(errs.values()), detail=json.dumps({k: f"{v:.1e}" for k, v in errs.items()}))
            except Exception as e:  # noqa: BLE001
                row.update(detail=fail_text(e))
                traceback.print_exc()
            rows.append(row)
            log(row)
    # whole model: outputs and all parameter gradients vs a float64 torch-backend model
    size = 64 if device.type == "cuda" else 8
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, size, size, generator=gen).to(device)
    t = torch.rand(2, 3, size, size, generator=gen).to(device)
    try:
        ref_out, ref_g, _ = model_outputs_and_grads(model, x, t, "torch", device, torch.float64)
        for path in ["fast_eager", "release", "torch"]:
            out, g, out_ng = model_outputs_and_grads(model, x, t, path, device)
            errs = {"out": rel(out, ref_out), "grads": rel(g, ref_g), "out_no_grad": rel(out_ng, ref_out)}
            rows.append(dict(check=f"model 2x{size}^2 {path} (fp32) vs torch fp64", max_rel=max(errs.values()),
                             tol=CHECK_TOL_MODEL, detail=json.dumps({k: f"{v:.1e}" for k, v in errs.items()})))
            log(rows[-1])
    except Exception as e:  # noqa: BLE001
        rows.append(dict(check="model grads", max_rel=float("nan"), tol=CHECK_TOL_MODEL, detail=fail_text(e)))
        traceback.print_exc()
        log(rows[-1])
    return rows

