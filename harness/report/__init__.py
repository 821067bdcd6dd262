"""Reports from the results store: CSV, Markdown/LaTeX tables, figures, and report.md.

``write_report(store_dir, experiment, out_dir)`` renders everything from stored records, so a
report can be re-rendered at any time without re-running (``python -m harness.report``), and
``ReportCallback`` calls it when a Hydra run or sweep ends.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback

from harness.report.stats import paired_bootstrap
from harness.store import Store

log = logging.getLogger("eabench.report")

IDENTITY = ("experiment", "run", "model", "family", "task", "seed", "status", "config_hash", "flops_method",
            "official_params", "official_gflops", "params_diff", "gflops_diff_pct", "gflops_conv_only",
            "official_gflops_conv_only")
COST = ("params", "gflops", "flops_input", "latency_ms", "peak_mem_mb", "device")
METRIC_COLS = ("psnr", "ssim", "lpips")


def _swept_columns(df: pd.DataFrame) -> list[str]:
    """Columns that came from a run's overrides (e.g. ``model.heads``), in first-seen order."""
    known = set(IDENTITY) | set(COST) | set(METRIC_COLS) | {"run", "train_s", "error", "psnr_delta"}
    return [c for c in df.columns if c not in known and not c.startswith(("erf_area@", "input_"))]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """Paper-style table: run, swept fields, params (M), GFLOPs, metrics, latency, status."""
    swept = _swept_columns(df)
    table = pd.DataFrame({"run": df["run"]})
    for c in swept:
        table[c] = df[c]
    table["params (M)"] = df["params"].map(lambda v: v / 1e6 if pd.notna(v) else None)
    table["GFLOPs (MACs)"] = df["gflops"]
    for m in METRIC_COLS:
        if m in df:
            table[m.upper() if m != "lpips" else "LPIPS"] = df[m]
    if "latency_ms" in df and df["latency_ms"].notna().any():
        table["latency (ms)"] = df["latency_ms"]
    for c in [c for c in df.columns if c.startswith("erf_area@")]:
        table[c.replace("erf_area@", "ERF area ratio @")] = df[c]
    if "psnr_delta" in df:
        table["ΔPSNR vs ref [95% CI]"] = df["psnr_delta"]
    if "official_params" in df:
        table["official params"] = df["official_params"]
        table["Δparams"] = df.get("params_diff")
        table["official GFLOPs"] = df["official_gflops"]
        table["ΔGFLOPs (%)"] = df.get("gflops_diff_pct")
        if "gflops_conv_only" in df:
            table["GFLOPs conv-only"] = df["gflops_conv_only"]
            table["official conv-only"] = df["official_gflops_conv_only"]
        table["FLOPs method"] = df.get("flops_method")
    table["status"] = df["status"]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    digits = {"SSIM": 4, "LPIPS": 4, "params (M)": 3}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], digits.get(c, 2)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, caption: str) -> str:
    cols = list(table.columns)
    digits = {"SSIM": 4, "LPIPS": 4, "params (M)": 3}
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("Δ", r"$\Delta$")  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}",
             r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule", " & ".join(esc(c) for c in cols) + r" \\",
             r"\midrule"]
    for _, row in table.iterrows():
        lines.append(" & ".join(esc(_fmt(row[c], digits.get(c, 2))) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def add_paired_statistics(df: pd.DataFrame, records: list[dict], reference: str | None = None) -> pd.DataFrame:
    """ΔPSNR of every run against a reference run on the same images, with a bootstrap 95 % CI."""
    by_run = {r.get("run_name"): r for r in records if r.get("status") == "ok" and r.get("metrics", {}).get("psnr")}
    if not by_run:
        return df
    ref_name = reference if reference in by_run else next(iter(by_run))
    ref = by_run[ref_name]["metrics"]["psnr"]
    deltas = []
    for run in df["run"]:
        rec = by_run.get(run)
        if rec is None or run == ref_name:
            deltas.append("reference" if run == ref_name else None)
            continue
        cur = rec["metrics"]["psnr"]
        if cur["names"] != ref["names"] or not all(map(math.isfinite, cur["values"] + ref["values"])):
            deltas.append(None)
            continue
        s = paired_bootstrap(cur["values"], ref["values"])
        deltas.append(f"{s['mean_diff']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
                      + (" *" if s["significant"] else ""))
    df = df.copy()
    df["psnr_delta"] = deltas
    return df


def seed_summary(df: pd.DataFrame, records: list[dict]) -> pd.DataFrame | None:
    """Mean ± std over seeds of each configuration (runs equal but for ``seed``), when repeated."""
    keys = []
    for r in records:
        swept = {k: v for k, v in (r.get("swept") or {}).items() if k != "seed"}
        keys.append(",".join(f"{k}={v}" for k, v in sorted(swept.items())) or str(r.get("model")))
    frame = df.assign(configuration=keys[: len(df)])
    frame = frame[frame["status"] == "ok"]
    if frame.empty or frame.groupby("configuration").size().max() < 2:
        return None
    metrics = [m for m in METRIC_COLS if m in frame and frame[m].notna().any()]
    rows = []
    for conf, grp in frame.groupby("configuration", sort=False):
        row = {"configuration": conf, "seeds": len(grp)}
        for m in metrics:
            row[f"{m.upper()} mean ± std"] = f"{grp[m].mean():.4f} ± {grp[m].std(ddof=1) if len(grp) > 1 else 0:.4f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _figures(df: pd.DataFrame, fig_dir: Path, caption: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    ok = df[df["status"] == "ok"]

    def save(fig, name: str, text: str) -> None:  # caption strip at the foot, then file and list entry
        fig.text(0.01, 0.005, caption, fontsize=6)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(fig_dir / name, dpi=130)
        plt.close(fig)
        out.append((name, text))
    if "psnr" in ok and ok["psnr"].notna().any() and ok["gflops"].notna().any():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for _, row in ok.iterrows():
            ax.scatter(row["gflops"], row["psnr"], s=40 + 400 * (row["params"] or 0) / max(1, ok["params"].max()))
            ax.annotate(str(row["run"]), (row["gflops"], row["psnr"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("GFLOPs (multiply-adds, fvcore convention) at the profile input")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title("Quality vs cost (marker area ~ parameters)", fontsize=10)
        ax.grid(alpha=0.3)
        save(fig, "psnr_vs_gflops.png", "PSNR against GFLOPs, one point per run.")
    if "latency_ms" in ok and ok["latency_ms"].notna().any() and "psnr" in ok:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ax.scatter(ok["latency_ms"], ok["psnr"])
        for _, row in ok.iterrows():
            ax.annotate(str(row["run"]), (row["latency_ms"], row["psnr"]), fontsize=7)
        ax.set_xlabel("latency (ms, median)")
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
        save(fig, "psnr_vs_latency.png", "PSNR against measured latency.")
    for metric, unit in (("psnr", "dB"), ("gflops", "GMACs"), ("params", "parameters")):
        if metric not in df or not df[metric].notna().any():
            continue
        fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(df) + 2), 4))
        values = df[metric].astype(float)
        colors = ["tab:blue" if s == "ok" else "tab:red" for s in df["status"]]
        ax.bar(range(len(df)), values.fillna(0), color=colors)
        ax.set_xticks(range(len(df)), [str(r) for r in df["run"]], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{metric} ({unit})")
        if metric == "psnr" and values.notna().any():
            lo = np.nanmin(values)
            ax.set_ylim(lo - 1, np.nanmax(values) + 0.5)
        ax.set_title(f"{metric} per run (red: failed)", fontsize=10)
        save(fig, f"bars_{metric}.png", f"{metric} per run.")
    return out


def _erf_figure(records: list[dict], fig_dir: Path, caption: str) -> list[tuple[str, str]]:
    """One grid of the runs' ERF maps on one colour scale, from the saved raw maps."""
    from harness.erf import erf_grid

    maps, scaling = {}, "power0.25"
    for r in records:
        erf = r.get("erf") or {}
        path = (erf.get("files") or {}).get("npy")
        if r.get("status") == "ok" and path and Path(path).is_file():
            maps[str(r.get("run_name"))] = np.load(path)
            scaling = erf.get("scaling", scaling)
    if not maps:
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    erf_grid(maps, fig_dir / "erf_grid.png", scaling, caption=caption)
    return [("erf_grid.png", f"Effective receptive fields (display scaling {scaling}, each map / its max).")]


def write_report(store_dir: str | Path, experiment: str, out_dir: str | Path, reference: str | None = None) -> Path:
    """Render ``reports/<experiment>/`` from the store; returns the report directory."""
    store = Store(store_dir)
    records = store.records(experiment)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        (out / "report.md").write_text(f"# {experiment}\n\nNo runs recorded in {store_dir}.\n")
        return out
    df = pd.DataFrame([_flat(r) for r in records])
    df = add_paired_statistics(df, records, reference)
    df.to_csv(out / "results.csv", index=False)
    env = records[-1].get("environment") or {}
    protocol = _protocol_line(records)
    caption = f"{experiment}: {protocol}; {env.get('device', '?')} ({env.get('cpu', '')}), torch {env.get('torch', '?')}"
    table = results_table(df)
    (out / "table.md").write_text(to_markdown(table))
    (out / "table.tex").write_text(to_latex(table, caption))
    figures = _figures(df, out / "figures", caption) + _erf_figure(records, out / "figures", caption)
    seeds = seed_summary(df, records)
    if seeds is not None:
        (out / "table_seeds.md").write_text(to_markdown(seeds))
    lines = [f"# Report: {experiment}", "", f"{len(df)} runs ({int((df['status'] == 'ok').sum())} ok, "
             f"{int((df['status'] != 'ok').sum())} failed). Protocol: {protocol}.", "",
             f"Environment: {env}", "", to_markdown(table), ""]
    lines += _input_lines(df)
    if "psnr_delta" in df:
        lines += ["ΔPSNR: paired per-image difference to the reference run (first listed), mean and bootstrap "
                  "95 % confidence interval over images; * marks an interval excluding 0.", ""]
    if seeds is not None:
        lines += ["## Over seeds", "", to_markdown(seeds), ""]
    failed = df[df["status"] != "ok"]
    for _, row in failed.iterrows():
        lines.append(f"- **failed** `{row['run']}`: {row.get('error')}")
    for name, text in figures:
        lines += ["", f"![{text}](figures/{name})", "", f"*{text} {caption}*"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out


def _input_lines(df: pd.DataFrame) -> list[str]:
    """One line per task: the metrics of the degraded input (bicubic-upscaled for SR), the floor
    every run of that task has to clear."""
    cols = [c for c in df.columns if c.startswith("input_")]
    if not cols:
        return []
    lines = []
    for task, group in df[df[cols].notna().any(axis=1)].groupby(df["task"].fillna("?")):
        values = ", ".join(f"{c[len('input_'):].upper()} {_fmt(group[c].iloc[0], 4 if 'psnr' not in c else 2)}"
                           for c in cols if group[c].notna().any())
        lines.append(f"Degraded input ({task}, same images and protocol; bicubic upscaling for SR): {values}.")
    return lines + [""] if lines else []


def _flat(record: dict) -> dict:
    from harness.store import flatten_record

    return flatten_record(record)


def _protocol_line(records: list[dict]) -> str:
    for r in records:
        for m, v in (r.get("metrics") or {}).items():
            p = v.get("protocol") or {}
            if m == "psnr":
                return (f"PSNR/SSIM {p.get('protocol', '?')} protocol, {p.get('space', p.get('channels', '?'))}, crop "
                        f"{p.get('crop_border', 0)}; task {r.get('task')}; data {r.get('dataset')}")
    return f"task {records[0].get('task')}"


class ReportCallback(Callback):
    """Hydra callback: write the experiment's report when a run or a sweep ends."""

    def _write(self, config) -> None:
        try:
            if not config.get("report", True):
                return
            path = write_report(config.store_dir, config.experiment_name, config.report_dir)
            log.info("report written to %s", path)
        except Exception as err:  # noqa: BLE001 - a report failure must not lose the runs
            log.error("report failed: %s: %s (re-render with python -m harness.report)", type(err).__name__, err)

    def on_run_end(self, config, **kwargs: Any) -> None:
        self._write(config)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self._write(config)
