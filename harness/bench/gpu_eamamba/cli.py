"""Command line of the GPU benchmark: runs the phases in order and writes OUT as it goes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import harness.models as hm
from harness.bench.gpu_eamamba.checks import phase_checks
from harness.bench.gpu_eamamba.kernels import copy_bandwidth, kernel_resources, phase_kernel, phase_sweep
from harness.bench.gpu_eamamba.model_runs import (
    INFERENCE_ORDER,
    compiled_child,
    phase_inference,
    phase_profile,
    phase_training,
    run_compiled_child,
)
from harness.bench.gpu_eamamba.paths import DATASHEET_TBPS, PATHS, TRAIN_PATHS
from harness.bench.gpu_eamamba.report import env_info, fmt, inference_pivot, markdown_table, plots, write_csv


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="eamamba")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--train", nargs="*", default=["8x128", "2x256", "1x384"])
    parser.add_argument("--paths", nargs="+", default=INFERENCE_ORDER, choices=INFERENCE_ORDER,
                        help="inference paths, in the order they run (torch/release first: the references)")
    parser.add_argument("--train-paths", nargs="+", default=TRAIN_PATHS, choices=TRAIN_PATHS)
    parser.add_argument("--torch-train", nargs="*", default=["8x128"],
                        help="training specs also run on the (slow) torch path")
    parser.add_argument("--deadline-s", type=float, default=480.0, help="stop starting new points after this")
    parser.add_argument("--point-limit-s", type=float, default=20.0, help="skip points estimated slower")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--no-kernel", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweeps", nargs="+", default=["step_bwd", "step_fwd", "tile"],
                        choices=["step_bwd", "step_fwd", "tile"], help="which kernel-knob sweeps run")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-path", default="fast_eager", choices=[p for p in PATHS if not PATHS[p].graph],
                        help="the (eager) path whose kernels are profiled")
    parser.add_argument("--train-first", action="store_true", help="run the training phase before inference")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) + CUDA graph")
    parser.add_argument("--compile-dynamic", action="store_true", help="one dynamic-shape compilation for all sizes")
    parser.add_argument("--compile-deadline-s", type=float, default=560.0,
                        help="the compiled phase (a child process) is killed at this time since start")
    parser.add_argument("--compiled-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    start = time.time()
    deadline = start + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cudnn_tf32_default = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.compiled_only:
        compiled_child(args, device)
        return
    command = "python -m harness.bench.gpu_eamamba " + " ".join(sys.argv[1:] if argv is None else argv)
    env = env_info(device)
    env["cudnn_tf32_default"] = cudnn_tf32_default  # this run sets TF32 per path (see PATHS)
    print("environment:", json.dumps(env), flush=True)

    def log(row):
        print(json.dumps({k: (fmt(v) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    md = [f"# EAMamba on {env.get('gpu', device.type)}: fast paths vs torch backend vs released-style path", "",
          f"Command: `{command}`", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]

    def save():
        (out / "gpu_eamamba.md").write_text("\n".join(md) + "\n")

    torch.manual_seed(0)
    model = hm.create(args.preset).to(device).eval()
    if not args.no_checks:
        rows = phase_checks(args, device, model, log)
        write_csv(out / "checks.csv", rows)
        md += ["## Correctness", "", "Relative error ‖ours − ref‖/‖ref‖; refs in float64 (torch backend).", "",
               markdown_table(rows, ["check", "max_rel", "tol", "detail"]), ""]
        save()
        print(md[-2], flush=True)
    if not args.no_kernel:
        bw = copy_bandwidth(device)
        rows = phase_kernel(args, device, log)
        write_csv(out / "scan_kernel.csv", rows)
        md += ["## Scan kernel", "",
               f"Measured device copy: {fmt(bw)} TB/s (read + write); datasheet {DATASHEET_TBPS} TB/s. "
               "min_MB: each input read once, each output written once (fp32). design_MB adds the "
               "segment pass's re-read of u, Δ, B.", "",
               markdown_table(rows, ["shape", "variant", "segments", "ms", "min_MB", "TBps_min_bytes", "pct_datasheet",
                                     "design_MB", "TBps_design_bytes", "note"]), ""]
        save()
        print(md[-2], flush=True)
    train_rows = None
    if args.train_first:
        train_rows = phase_training(args, device, model, log, deadline, [])
        write_csv(out / "training.csv", train_rows)
    refs: dict = {}
    inf_rows = phase_inference(args, device, model, log, deadline, args.paths, args.sizes, refs)
    write_csv(out / "inference.csv", inf_rows)
    table, cols = inference_pivot(inf_rows)
    md += ["## Inference, batch 1, ms (median) and peak allocated MB", "",
           "Peak: the model's weights plus the most the point allocated on top of what was resident "
           "when it started (warm-up, capture and timed calls).", "",
           markdown_table(table, cols), "", "Long form (first_call_s includes compilation / graph capture):", "",
           markdown_table(inf_rows, ["size", "path", "ms", "reps", "peak_MB", "max_rel_diff", "diff_vs", "first_call_s", "note"]), ""]
    save()
    print(md[-6], flush=True)
    if not args.no_profile and time.time() < deadline:
        for title, rows in phase_profile(args, device, model, log):
            md += [f"## GPU time by kernel: {title}", "", markdown_table(rows, ["kernel", "calls", "ms", "pct"]), ""]
        save()
    if train_rows is None:
        train_rows = phase_training(args, device, model, log, deadline, inf_rows)
        write_csv(out / "training.csv", train_rows)
    md += ["## Training step (forward + backward + AdamW, L1 loss, fp32)", "",
           markdown_table(train_rows, ["batch", "size", "path", "ms", "reps", "images_per_s", "peak_MB", "first_call_s", "note"]), ""]
    save()
    print(md[-2], flush=True)
    if not args.no_sweep and time.time() < deadline:
        rows = phase_sweep(args, device, log, deadline)
        md += ["## Kernel settings sweep (routed all_around forward / backward, ms)", "",
               markdown_table(rows, ["shape", "setting", "fwd_routed_ms", "bwd_routed_ms", "note"]), ""]
        save()
        print(md[-2], flush=True)
    res = kernel_resources()
    if res:
        md += ["## Compiled Triton kernels (registers, spills)", "",
               markdown_table(res, ["kernel", "variants", "n_regs", "n_spills", "shared", "num_warps"]), ""]
        save()
        print(md[-2], flush=True)
    if args.compile and device.type == "cuda":
        remaining = args.compile_deadline_s - (time.time() - start)
        if remaining < 30:
            md += ["## torch.compile", "", "not run (no time left)", ""]
        else:
            rows, note = run_compiled_child(args, refs, remaining)
            inf_rows += rows
            write_csv(out / "inference.csv", inf_rows)
            table, cols = inference_pivot(inf_rows)
            md += [f"## Inference with torch.compile(dynamic={bool(args.compile_dynamic)}) + CUDA graph (fast_compiled)",
                   "", note, "",
                   markdown_table(table, cols), "",
                   markdown_table(rows, ["size", "path", "ms", "reps", "peak_MB", "max_rel_diff", "diff_vs",
                                         "first_call_s", "note"]), ""]
            print("\n".join(md[-6:]), flush=True)
        save()
    plots(out, inf_rows, train_rows)
    md += [f"Total wall time: {time.time() - start:.0f} s"]
    save()
    print(f"done in {time.time() - start:.0f} s", flush=True)

