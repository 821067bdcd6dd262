"""Strict-fp32 convolutions on an NVIDIA GPU, batch 1. Prints Markdown tables; ``--out`` also
writes them as CSV.

1. 1×1 convolutions at EAMamba's mixer shapes: cuDNN (``F.conv2d``) against cuBLAS (``mm`` on the
   (C, H·W) view);
2. with ``--model-convs SIZE``: every dense k×k convolution of EAMamba at a SIZE² input, run
   alone at its input shape under cuDNN in strict fp32, cuDNN with TF32, and PyTorch's own
   kernels (cuDNN disabled): time and the peak memory it allocates (cuDNN workspace included).

    python -m harness.bench.gpu_pointwise --out DIR [--model-convs 512] [--model-convs-train 8x128]
"""
from __future__ import annotations

import argparse
import os

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.profile.environment import environment
from harness.profile.timing import time_call
from harness.models import registry
from harness.report.markdown import markdown_table

# (in, out, side): EAMamba's SimpleGate mixer (dim 64, expansion 2) at its four levels, and the
# wider decoder / refinement blocks at full resolution
SHAPES = [(64, 128, 256), (64, 64, 256), (128, 256, 256), (128, 128, 256), (128, 256, 128), (128, 128, 128),
          (256, 512, 64), (256, 256, 64), (512, 1024, 32), (512, 512, 32), (64, 128, 1024), (128, 256, 1024)]


def cuda_ms(fn, reps: int = 50) -> float:
    """Median CUDA-event milliseconds of ``fn()`` after 5 warm-up calls."""
    return time_call(fn, "cuda", warmup=5, repeats=reps, timer="cuda_event")["median_ms"]


def model_convs(size: int, device: torch.device, batch: int = 1, train: bool = False) -> pd.DataFrame:
    """Each dense k×k convolution of EAMamba at a batch × size² input, alone, under three
    settings: the forward (``train``: forward and backward, input and weight gradients)."""
    model = registry.create("eamamba").to(device).eval()
    inputs: dict[str, tuple[nn.Conv2d, torch.Size]] = {}

    def record(name):
        def hook(mod, inp, out):  # returns None: the output is left as it is
            inputs.setdefault(name, (mod, inp[0].shape))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size != (1, 1)]
    with torch.no_grad():
        model(torch.rand(batch, 3, size, size, device=device))
    for h in hooks:
        h.remove()
    settings = {"cudnn_fp32": dict(enabled=True, allow_tf32=False), "cudnn_tf32": dict(enabled=True, allow_tf32=True),
                "native_fp32": dict(enabled=False, allow_tf32=False)}
    rows = []
    with torch.set_grad_enabled(train):
        for name, (conv, shape) in inputs.items():
            x = torch.randn(shape, device=device, requires_grad=train)
            grad = torch.randn(shape[0], conv.out_channels, shape[2], shape[3], device=device) if train else None

            def step(conv=conv, x=x, grad=grad):
                if train:
                    conv.zero_grad(set_to_none=True)
                    torch.autograd.backward(conv(x), grad)
                else:
                    conv(x)

            row = dict(conv=name, shape=f"{shape[1]}->{conv.out_channels} k{conv.kernel_size[0]} @ {shape[2]}x{shape[3]}")
            for label, flags in settings.items():
                with torch.backends.cudnn.flags(enabled=flags["enabled"], benchmark=False, deterministic=False,
                                                allow_tf32=flags["allow_tf32"]):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    row[f"{label}_ms"] = cuda_ms(step, reps=10)
                    row[f"{label}_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--model-convs", type=int, nargs="*", default=[], metavar="SIZE")
    parser.add_argument("--model-convs-train", nargs="*", default=[], metavar="BxSIZE",
                        help="the same, forward and backward, at batch B")
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
    for size in args.model_convs:
        convs = model_convs(size, dev)
        print(f"\nEAMamba's dense convolutions at {size}^2, each alone (ms, MB allocated on top of its input):")
        print(markdown_table(convs, digits=3))
        if args.out:
            convs.to_csv(os.path.join(args.out, f"model_convs_{size}.csv"), index=False)
    for spec in args.model_convs_train:
        batch, size = (int(v) for v in spec.lower().split("x"))
        convs = model_convs(size, dev, batch, train=True)
        print(f"\nEAMamba's dense convolutions at {batch}x{size}^2, forward + backward, each alone:")
        print(markdown_table(convs, digits=3))
        if args.out:
            convs.to_csv(os.path.join(args.out, f"model_convs_train_{batch}x{size}.csv"), index=False)


if __name__ == "__main__":
    main()
