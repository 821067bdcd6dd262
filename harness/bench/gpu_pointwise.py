"""Strict-fp32 1×1 convolutions on an NVIDIA GPU: cuDNN (``F.conv2d``) against cuBLAS (``mm`` on
the (C, H·W) view), at EAMamba's mixer shapes, batch 1. Prints a Markdown table; ``--out`` also
writes it as CSV.

    python -m harness.bench.gpu_pointwise --out DIR
"""
from __future__ import annotations

import argparse
import os

import pandas as pd
import torch
import torch.nn.functional as F

from harness.bench.timing import environment
from harness.profile.ladder import markdown_table

# (in, out, side): EAMamba's SimpleGate mixer (dim 64, expansion 2) at its four levels, and the
# wider decoder / refinement blocks at full resolution
SHAPES = [(64, 128, 256), (64, 64, 256), (128, 256, 256), (128, 128, 256), (128, 256, 128), (128, 128, 128),
          (256, 512, 64), (256, 256, 64), (512, 1024, 32), (512, 512, 32), (64, 128, 1024), (128, 256, 1024)]


def cuda_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(torch.tensor(times).median())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_pointwise needs a CUDA device")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    rows = []
    with torch.no_grad():
        for cin, cout, side in SHAPES:
            hw = side * side
            x = torch.randn(1, cin, side, side, device=dev)
            w = torch.randn(cout, cin, 1, 1, device=dev) / cin ** 0.5
            ref = F.conv2d(x, w)
            via_mm = torch.mm(w.view(cout, cin), x.view(cin, hw)).view(1, cout, side, side)
            conv_ms = cuda_ms(lambda: F.conv2d(x, w))
            mm_ms = cuda_ms(lambda: torch.mm(w.view(cout, cin), x.view(cin, hw)))
            gflop = 2 * cin * cout * hw / 1e9
            rows.append(dict(shape=f"{cin}->{cout} @ {side}^2", conv_ms=conv_ms, mm_ms=mm_ms,
                             conv_TFLOPs=gflop / conv_ms, mm_TFLOPs=gflop / mm_ms,
                             max_rel_diff=float((via_mm - ref).abs().max() / ref.abs().max())))
    table = pd.DataFrame(rows)
    print("environment:", environment(dev))
    print(markdown_table(table, digits=4))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        table.to_csv(os.path.join(args.out, "pointwise.csv"), index=False)


if __name__ == "__main__":
    main()
