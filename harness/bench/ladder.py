"""Cost-versus-resolution ladder from the command line: prints a Markdown table, writes CSV and plots.

    python -m harness.bench.ladder --presets eamamba_tiny dncnn_tiny --sizes 64 128 256 \
        --device cpu --out reports/scaling_cpu

Writes ``OUT/results.csv`` (one row per model and size; ``latency_ms`` = median, ``gflops`` =
GMACs in the papers' convention, ``peak_mem_mb``, ``status``), ``OUT/report.md`` (environment,
protocol, table, figures), ``OUT/environment.json`` and ``OUT/figures/ladder_{metric}.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from harness.profile.ladder import MEASURES, plot_ladder, resolution_ladder
from harness.report.markdown import markdown_table

TABLE_COLUMNS = ["model", "height", "width", "status", "latency_median_ms", "latency_p90_ms", "latency_min_ms",
                 "repeats", "peak_mem_mb", "gmacs", "params"]


def parse_size(text: str) -> int | tuple[int, int]:
    """``256`` (square) or ``2160x3840`` (height x width)."""
    if "x" in text.lower():
        h, w = text.lower().split("x", 1)
        return int(h), int(w)
    return int(text)


def parse_overrides(items: list[str] | None) -> dict:
    """``key=value`` pairs; values parsed as YAML (numbers, lists, booleans)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--override expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Timing knobs shared by the ladder and the presets table."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "tf32", "default"), default="fp32",
                        help="fp32 = strict (TF32 off); default = PyTorch's flags as they are")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", nargs="?", const=True, default=False,
                        help="torch.compile the model (optionally a mode, e.g. max-autotune)")
    parser.add_argument("--cuda-graphs", action="store_true", help="time CUDA graph replays (CUDA only)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls (protocol: >= 10 or >= 1 s)")
    parser.add_argument("--min-warmup-s", type=float, default=1.0)
    parser.add_argument("--max-warmup-s", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-time-s", type=float, default=None, help="time budget for the timed calls of a point")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE", help="preset constructor override")


def apply_common_arguments(args: argparse.Namespace) -> None:
    """Process-wide settings from ``add_common_arguments``: CPU threads and cuDNN autotuning."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", required=True)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[64, 128, 256, 512, 1024, 2048],
                        help="input sizes: N (N x N) or HxW, e.g. 2160x3840 for a 4K frame")
    parser.add_argument("--measure", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--memory-cap-mb", default="auto",
                        help="skip points whose estimated memory exceeds this (MB); 'auto' = 80%% of free RAM on "
                             "CPU; 'none' = no cap")
    parser.add_argument("--out", required=True)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    cap = None if str(args.memory_cap_mb).lower() == "none" else (
        "auto" if args.memory_cap_mb == "auto" else float(args.memory_cap_mb))
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)

    def progress(row: dict) -> None:
        lat = row.get("latency_median_ms")
        print(f"  {row['model']} {row.get('height')}x{row.get('width')}: {row.get('status')}"
              + (f", {lat:.1f} ms" if isinstance(lat, float) else "")
              + (f", {row['peak_mem_mb']:.1f} MB" if isinstance(row.get("peak_mem_mb"), float) else "")
              + (f", {row['gmacs']:.3f} GMACs" if isinstance(row.get("gmacs"), float) else ""),
              file=sys.stderr, flush=True)

    df = resolution_ladder(args.presets, args.sizes, device=args.device, measure=args.measure,
                           batch_size=args.batch, precision=args.precision, channels_last=args.channels_last,
                           compile=args.compile, cuda_graphs=args.cuda_graphs, warmup=args.warmup,
                           min_warmup_s=args.min_warmup_s, max_warmup_s=args.max_warmup_s, repeats=args.repeats,
                           max_time_s=args.max_time_s, memory_cap_mb=cap,
                           overrides=parse_overrides(args.override), on_row=progress)
    env = df.attrs["environment"]
    df["latency_ms"] = df["latency_median_ms"]
    df["gflops"] = df["gmacs"]  # the papers' "GFLOPs" are GMACs (fvcore convention)
    df.to_csv(out / "results.csv", index=False)
    (out / "environment.json").write_text(json.dumps({"environment": env, "protocol": df.attrs["protocol"],
                                                      "argv": sys.argv[1:] if argv is None else argv}, indent=2))
    figures = []
    for m in args.measure:
        path = out / "figures" / f"ladder_{m}.png"
        plot_ladder(df, path, m)
        figures.append(path)
    digits = {"gmacs": 3, "repeats": 0, "params": 0, "height": 0, "width": 0, "peak_mem_mb": 1,
              "latency_median_ms": 1, "latency_p90_ms": 1, "latency_min_ms": 1}
    table = markdown_table(df, TABLE_COLUMNS, digits=digits)
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    print(f"environment: {env_line}")
    print(f"protocol: {df.attrs['protocol']}; memory: {', '.join(sorted(set(df['mem_method'].dropna())))}; "
          f"GMACs: fvcore, 1 multiply-add = 1 (the papers' 'GFLOPs')")
    print(table)
    report = [f"# Cost versus resolution ({args.device})", "", f"Environment: {env_line}", "",
              f"Protocol: {df.attrs['protocol']}. Peak memory method: "
              f"{', '.join(sorted(set(df['mem_method'].dropna()))) or '–'}. GMACs counted by fvcore at every size "
              f"(1 multiply-add = 1, the papers' 'GFLOPs').", "", table, ""]
    report += [f"![{p.stem}](figures/{p.name})" for p in figures]
    (out / "report.md").write_text("\n".join(report) + "\n")
    print(f"wrote {out / 'results.csv'}, {out / 'report.md'} and {len(figures)} figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
