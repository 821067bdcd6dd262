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

from harness.metrics import METRICS
from harness.record import COST_COLUMNS, TABLE_LABELS, flatten_record
from harness.report.markdown import format_cell, latex_table, markdown_table
from harness.report.stats import paired_bootstrap
from harness.store import Store

log = logging.getLogger("eabench.report")

# Table digits by header: params in millions, metrics as their registry says, everything else 2.
DIGITS = {TABLE_LABELS["params"]: 3, **{m.label: m.digits for m in METRICS.values()}}
# Columns of results.csv a table shows, in order (after the run label), with their headers.
TABLE_COLUMNS = ("params", "gflops", *METRICS, "latency_ms", "peak_mem_mb", "device", "threads")


def run_labels(records: list[dict]) -> list[str]:
    """Each run named by the swept values that differ between the runs (the model's name alone
    when it is the only one), e.g. "eamamba_tiny" or "model.heads=4"; the model when none differ."""
    swept = [dict(r.get("swept") or {}) for r in records]
    keys = list(dict.fromkeys(k for s in swept for k in s))
    varying = [k for k in keys if len({str(s.get(k)) for s in swept}) > 1]
    labels = []
    for r, s in zip(records, swept):
        parts = [str(s[k]) if k == "model" else f"{k}={s[k]}" for k in varying if k in s]
        labels.append(", ".join(parts) or str(r.get("model") or r.get("run_name")))
    return labels


def _header(column: str) -> str:
    return METRICS[column].label if column in METRICS else TABLE_LABELS.get(column, column)


def results_table(df: pd.DataFrame, labels: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Paper-style table and the values every row shares (left out of the table).

    One row per run, labelled by its swept values (``run_labels``), then params (M), GFLOPs
    (multiply-adds), the registered metrics, latency, peak memory, device, ΔPSNR and, for
    paper_efficiency, the official figures. With two rows or more a column whose value is the
    same in every row is returned in the second value instead; an empty column is dropped.
    """
    table = pd.DataFrame({"run": labels if labels is not None else df["run"]})
    for c in TABLE_COLUMNS:
        if c in df:
            values = df[c].map(lambda v: v / 1e6 if pd.notna(v) else None) if c == "params" else df[c]
            table[_header(c)] = values
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
    shared: dict[str, Any] = {}
    for col in list(table.columns[1:]):
        values = table[col]
        if not values.notna().any():
            table = table.drop(columns=col)
        elif len(table) > 1 and values.notna().all() and values.astype(str).nunique() == 1:
            shared[col] = values.iloc[0]
            table = table.drop(columns=col)
    return table, shared


def shared_line(shared: dict[str, Any]) -> str:
    """"Every run: device cpu, status ok" for the columns ``results_table`` left out."""
    if not shared:
        return ""
    return "Every run: " + ", ".join(f"{k} {format_cell(v, DIGITS.get(k, 2))}" for k, v in shared.items()) + "."


def units_line(df: pd.DataFrame) -> str:
    """The units of the cost columns present in ``df`` (from ``harness.record.COST_COLUMNS``)."""
    units = [f"{c.name} {c.unit}" for c in COST_COLUMNS if c.unit and c.name in df and df[c.name].notna().any()]
    return ("Units in results.csv: " + "; ".join(units) + " (gflops: the papers' \"GFLOPs\", fvcore "
            "multiply-adds).") if units else ""


def to_markdown(table: pd.DataFrame) -> str:
    """A report table as Markdown (``harness.report.markdown``) with the report's digits."""
    return markdown_table(table, digits=DIGITS)


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A report table as LaTeX with the report's digits."""
    return latex_table(table, caption, digits=DIGITS)


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
    metrics = [m for m in METRICS if m in frame and frame[m].notna().any()]
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
            ax.annotate(str(row["label"]), (row["gflops"], row["psnr"]), fontsize=7, xytext=(3, 3),
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
            ax.annotate(str(row["label"]), (row["latency_ms"], row["psnr"]), fontsize=7)
        ax.set_xlabel("latency (ms, median)")
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
        save(fig, "psnr_vs_latency.png", "PSNR against measured latency.")
    for metric, unit in (("psnr", "dB"), ("gflops", "1e9 multiply-adds"), ("params", "parameters")):
        if metric not in df or not df[metric].notna().any():
            continue
        fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(df) + 2), 4))
        values = df[metric].astype(float)
        colors = ["tab:blue" if s == "ok" else "tab:red" for s in df["status"]]
        ax.bar(range(len(df)), values.fillna(0), color=colors)
        ax.set_xticks(range(len(df)), [str(r) for r in df["label"]], rotation=30, ha="right", fontsize=7)
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
    df = pd.DataFrame([flatten_record(r) for r in records])
    df = add_paired_statistics(df, records, reference)
    df.insert(2, "label", run_labels(records))
    df.to_csv(out / "results.csv", index=False)
    env = records[-1].get("environment") or {}
    protocol = _protocol_line(records)
    caption = f"{experiment}: {protocol}; {env.get('device', '?')} ({env.get('cpu', '')}), torch {env.get('torch', '?')}"
    table, shared = results_table(df, list(df["label"]))
    if len(df) > 1 and df["model"].nunique(dropna=False) == 1:  # the label leaves out a model every run shares
        shared = {"model": df["model"].iloc[0], **shared}
    (out / "table.md").write_text(to_markdown(table))
    (out / "table.tex").write_text(to_latex(table, f"{caption}. {shared_line(shared)}".rstrip(". ")))
    figures = _figures(df, out / "figures", caption) + _erf_figure(records, out / "figures", caption)
    seeds = seed_summary(df, records)
    if seeds is not None:
        (out / "table_seeds.md").write_text(to_markdown(seeds))
    lines = [f"# Report: {experiment}", "", f"{len(df)} runs ({int((df['status'] == 'ok').sum())} ok, "
             f"{int((df['status'] != 'ok').sum())} failed). Protocol: {protocol}.", "",
             f"Environment: {env}", ""] + ([shared_line(shared), ""] if shared else []) + [to_markdown(table)]
    lines += [units_line(df), ""]
    lines += _input_lines(df)
    if "psnr_delta" in df:
        lines += ["ΔPSNR: paired per-image difference to the reference run (first listed), mean and bootstrap "
                  "95 % confidence interval over images; * marks an interval excluding 0.", ""]
    if seeds is not None:
        lines += ["## Over seeds", "", to_markdown(seeds), ""]
    failed = df[df["status"] != "ok"]
    for _, row in failed.iterrows():
        lines.append(f"- **failed** `{row['label']}`: {row.get('error')}")
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
        values = ", ".join(f"{c[len('input_'):].upper()} {format_cell(group[c].iloc[0], 4 if 'psnr' not in c else 2)}"
                           for c in cols if group[c].notna().any())
        lines.append(f"Degraded input ({task}, same images and protocol; bicubic upscaling for SR): {values}.")
    return lines + [""] if lines else []


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
