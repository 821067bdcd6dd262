"""Selective-scan backends at EAMamba's shapes for a 256² input, and the full model forward.

    python -m harness.bench.scan [--threads 2] [--repeats 5] [--skip-model]

Prints ms per call (median of repeats after warm-up) per backend for the five (d, L) shapes
the released model scans at 256² (N = 16, 8 heads, batch 1), beside the materialise-then-loop
algorithm of mamba_ssm's ``selective_scan_ref`` (Δ·A and Δ·B·u materialised as (b, d, L, N),
then one Python step per position), which is what a CPU user of the release runs.
Then the full ``eamamba`` forward at 1×3×256×256 per CPU backend.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import harness.models as hm
from harness.profile.environment import environment
from harness.profile.timing import time_call
from harness.ops import scan_backends, selective_scan, use_backend

SHAPES = [(64, 65536), (128, 65536), (128, 16384), (256, 4096), (512, 1024)]


def materialised_loop_scan(u, delta, A, B, C, D, delta_bias):
    """mamba_ssm's selective_scan_ref algorithm (grouped B/C, softplus), for comparison only."""
    b, d, L = u.shape
    g = B.shape[1]
    delta = F.softplus(delta + delta_bias[:, None])
    Bx = B.repeat_interleave(d // g, dim=1)  # (b, d, n, L)
    Cx = C.repeat_interleave(d // g, dim=1)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bx, u)
    x = u.new_zeros(b, d, A.shape[1])
    ys = []
    for i in range(L):
        x = dA[:, :, i] * x + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", x, Cx[:, :, :, i]))
    return torch.stack(ys, dim=2) + u * D[:, None]


def scan_inputs(d: int, L: int, n: int = 16, heads: int = 8):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, d, L, generator=g)
    delta = torch.randn(1, d, L, generator=g) * 0.5 - 3.0
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B = torch.randn(1, heads, n, L, generator=g)
    C = torch.randn(1, heads, n, L, generator=g)
    return u, delta, A, B, C, torch.ones(d), torch.zeros(d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow materialise-then-loop column")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backends = [b for b in scan_backends() if b not in ("reference", "mamba_ssm")]
    print("environment:", environment())
    cols = (["loop_ref"] if not args.skip_loop else []) + backends
    print("\nselective scan forward, ms per call (median), batch 1, N 16, 8 heads")
    print("| d | L | " + " | ".join(cols) + " | " + " | ".join(f"speed-up {b}" for b in backends) + " |")
    print("|---|---|" + "---|" * (2 * len(cols) - (0 if args.skip_loop else 1)))
    with torch.no_grad():
        for d, L in SHAPES:
            u, delta, A, B, C, D, bias = scan_inputs(d, L)
            row = {}
            if not args.skip_loop:
                row["loop_ref"] = time_call(lambda: materialised_loop_scan(u, delta, A, B, C, D, bias),
                                            warmup=1, repeats=max(1, args.repeats // 2))["median_ms"]
            for b in backends:
                row[b] = time_call(lambda: selective_scan(u, delta, A, B, C, D, delta_bias=bias,
                                                          delta_softplus=True, backend=b),
                                   repeats=args.repeats)["median_ms"]
            speed = [f"{row['loop_ref'] / row[b]:.1f}x" if "loop_ref" in row else "-" for b in backends]
            print(f"| {d} | {L} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " | " + " | ".join(speed) + " |")
    if args.skip_model:
        return
    print("\nfull eamamba forward, 1x3x256x256, fp32, eval, ms (median of 3 after 1 warm-up)")
    model = hm.create("eamamba").eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        for b in backends:
            with use_backend(b):
                t = time_call(lambda: model(x), warmup=1, repeats=3)
            print(f"| {b} | {t['median_ms']:.0f} ms | min {t['min_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
