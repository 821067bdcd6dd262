"""Full-size presets table: parameters, GMACs, latency and peak memory at several sizes.

    python -m harness.bench.profile_presets --presets eamamba restormer nafnet_sidd_w32 \
        --sizes 256 1024 --device cuda --out reports/hardware/h200

One row per preset: params (exact) beside the official count, GMACs at the preset's FLOP input
(``meta.flops_input``, fvcore, 1 multiply-add = 1, conv-only column too) beside the official
figure, then for each size the latency median / p90 (ms) and peak memory (MB), plus the
official-code anchors measured on an H200 where we have them. Writes ``OUT/presets.csv`` (wide),
``OUT/results.csv`` (one row per preset and size, the interface's columns), ``OUT/report.md``,
``OUT/environment.json`` and ``OUT/figures/presets_{latency,memory}.png``. A preset that fails
to build or run is a row with its status; the script always finishes. ``--no-flops`` skips
counting (fvcore traces a real forward: slow on CPU, and it needs the fvcore package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from harness.bench.ladder import add_common_arguments, apply_common_arguments, parse_overrides, parse_size
from harness.profile.ladder import plot_ladder, resolution_ladder
from harness.report.markdown import markdown_table

DEFAULT_PRESETS = ["eamamba", "restormer", "mambairunet_realdn", "nafnet_sidd_w32", "dncnn_color20",
                   "mambair_colordn", "swinir_colordn", "eamamba_sr_x4"]
# Official code on an H200, fp32, batch 1, ms at 256^2 and 1024^2 (issue 5's anchors).
ANCHORS_H200_MS = {
    "eamamba": {256: 96.0, 1024: 502.0},
    "restormer": {256: 30.0, 1024: 372.0},
    "mambairunet_realdn": {256: 76.0, 1024: 935.0},
    "nafnet_sidd_w32": {256: 20.0, 1024: 40.0},
}


def _size_key(size) -> str:
    return f"{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"


def count_preset_flops(name: str, device: str) -> dict:
    """GMACs of preset ``name`` at its meta ``flops_input`` (on ``device``)."""
    from harness.models import create, preset_meta
    from harness.profile import count_flops

    meta = preset_meta(name)
    shape = tuple(meta.get("flops_input") or (1, 3, 256, 256))
    model = create(name).to(device)
    t0 = time.perf_counter()
    res = count_flops(model, shape, device=device)
    return {"flops_input": "x".join(map(str, shape)), "gmacs": res.gmacs, "gmacs_conv_only": res.conv_only / 1e9,
            "unsupported_ops": ", ".join(sorted(res.unsupported)), "flops_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None,
                        help=f"presets (default: those of {DEFAULT_PRESETS} that exist; 'all' = every non-tiny preset)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[256, 1024])
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--scan-backend", default="auto",
                        help="selective-scan backend for EAMamba/MambaIR presets (e.g. torch, triton); "
                             "harness.ops.scan_<name> is imported first when it exists")
    parser.add_argument("--out", required=True)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    from harness.models import available, preset_meta
    from harness.ops import use_backend

    if args.scan_backend != "auto":
        import importlib

        try:
            importlib.import_module(f"harness.ops.scan_{args.scan_backend}")
        except ImportError:
            pass  # built-in backends (torch, reference, cpp) need no import

    names = available()
    if args.presets is None:
        presets = [p for p in DEFAULT_PRESETS if p in names]
    elif args.presets == ["all"]:
        presets = [p for p in names if not p.endswith("_tiny")]
    else:
        presets = args.presets
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    measure = ["latency"] + ([] if args.no_memory else ["memory"])
    overrides = parse_overrides(args.override)
    rows, long_frames = [], []
    env, protocol = None, ""
    for name in presets:
        row: dict = {"preset": name}
        try:
            meta = preset_meta(name)
            row.update(family=meta.get("family"), official_params=meta.get("official_params"),
                       official_gmacs=meta.get("official_gflops"))
        except Exception as exc:  # unknown preset: keep going
            row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(f"{name}: {row['status']}", file=sys.stderr, flush=True)
            continue
        if not args.no_flops:
            try:
                row.update(count_preset_flops(name, args.device))
            except Exception as exc:
                row["flops_status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                if str(args.device).startswith("cuda"):
                    torch.cuda.empty_cache()
        with use_backend(args.scan_backend):
            df = resolution_ladder([name], args.sizes, device=args.device, measure=measure, batch_size=args.batch,
                                   precision=args.precision, channels_last=args.channels_last,
                                   compile=args.compile, cuda_graphs=args.cuda_graphs, warmup=args.warmup,
                                   min_warmup_s=args.min_warmup_s, max_warmup_s=args.max_warmup_s,
                                   repeats=args.repeats, max_time_s=args.max_time_s, memory_cap_mb="auto",
                                   overrides=overrides)
        env, protocol = df.attrs["environment"], df.attrs["protocol"]
        long_frames.append(df)
        if df["params"].notna().any():
            row["params"] = int(df["params"].dropna().iloc[0])
        statuses = []
        for size, (_, r) in zip(args.sizes, df.iterrows()):
            k = _size_key(size)
            row[f"ms@{k}"] = r.get("latency_median_ms")
            row[f"p90_ms@{k}"] = r.get("latency_p90_ms")
            if not args.no_memory:
                row[f"mem_mb@{k}"] = r.get("peak_mem_mb")
            anchor = ANCHORS_H200_MS.get(name, {}).get(size if isinstance(size, int) else -1)
            if anchor is not None:
                row[f"official_h200_ms@{k}"] = anchor
            statuses.append(f"{k}: {r['status']}")
            if r.get("scan_backend"):
                row["scan_backend"] = r.get("scan_backend")
        row["status"] = "ok" if all(s.endswith(": ok") for s in statuses) else "; ".join(statuses)
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k != "preset"), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "presets.csv", index=False)
    long = pd.concat(long_frames, ignore_index=True) if long_frames else pd.DataFrame()
    if len(long):
        long.attrs["environment"], long.attrs["protocol"] = env, protocol
        gm = {r["preset"]: r.get("gmacs") for r in rows}
        long["latency_ms"] = long["latency_median_ms"]
        long["gflops"] = long["model"].map(gm)  # GMACs at the preset's FLOP input (papers' "GFLOPs")
        long.to_csv(out / "results.csv", index=False)
        figures = [plot_ladder(long, out / "figures" / f"presets_{m}.png", m) for m in measure]
    else:
        figures = []
    env = env or {}
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    digits = {c: (0 if c in ("params", "official_params") else 3 if "gmacs" in c else 1) for c in table.columns}
    cols = [c for c in ["preset", "params", "official_params", "flops_input", "gmacs", "gmacs_conv_only",
                        "official_gmacs"] if c in table.columns]
    cols += [c for c in table.columns if "@" in c] + [c for c in ("scan_backend", "status") if c in table.columns]
    md = markdown_table(table, cols, digits)
    print(f"environment: {env_line}")
    print(f"protocol: {protocol}; GMACs: fvcore at meta.flops_input, 1 multiply-add = 1 (the papers' 'GFLOPs'); "
          f"official_h200_ms: the official code on an H200, fp32, batch 1")
    print(md)
    report = [f"# Full-size presets on {args.device}", "", f"Environment: {env_line}", "",
              f"Protocol: {protocol}. Peak memory: "
              f"{', '.join(sorted(set(long['mem_method'].dropna()))) if len(long) and 'mem_method' in long else '–'}. "
              "GMACs: fvcore at each preset's FLOP input, 1 multiply-add = 1 (the papers' 'GFLOPs'); "
              "`official_h200_ms@N`: the official code on an H200 (fp32, batch 1), for comparison.", "", md, ""]
    report += [f"![{Path(f).stem}](figures/{Path(f).name})" for f in figures]
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "environment.json").write_text(json.dumps({"environment": env, "protocol": protocol,
                                                      "argv": sys.argv[1:] if argv is None else argv}, indent=2))
    print(f"wrote {out}/presets.csv, results.csv, report.md, {len(figures)} figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
