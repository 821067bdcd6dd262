"""The benchmark's output: Markdown tables, CSV files, the figure, the environment."""

from __future__ import annotations

import csv
from pathlib import Path

from harness.bench.gpu_eamamba.paths import PATHS, TRAIN_PATHS
from harness.ops import scan_triton_launch as launch
from harness.profile.environment import environment
from harness.report.markdown import markdown_table as shared_markdown_table


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        if v == 0:
            return "0"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """``harness.report.markdown.markdown_table`` of ``rows`` (missing cells empty), 3 significant decimals."""
    return shared_markdown_table([{c: r.get(c, "") for c in cols} for r in rows], cols, digits=3)


def write_csv(path: Path, rows: list[dict]):
    if not rows:
        return
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def inference_pivot(rows) -> tuple[list[dict], list[str]]:
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]
    table = []
    for size in sorted({r["size"] for r in rows}):
        line = {"size": f"{size}²"}
        for p in paths:
            r = next((r for r in rows if r["size"] == size and r["path"] == p), None)
            if r is None:
                continue
            line[f"{p} ms"] = r["ms"] if r["ms"] == r["ms"] else r.get("note", "–")
            line[f"{p} MB"] = r.get("peak_MB", float("nan"))
        rel_ = next((r for r in rows if r["size"] == size and r["path"] == "fast"), {})
        fast_ms = rel_.get("ms", float("nan"))
        rl = next((r for r in rows if r["size"] == size and r["path"] == "release"), {})
        line["speed-up fast vs release"] = (rl.get("ms", float("nan")) / fast_ms) if fast_ms == fast_ms else float("nan")
        diffs = [r["max_rel_diff"] for r in rows if r["size"] == size and "max_rel_diff" in r
                 and PATHS[r["path"]].precision == "strict" and not PATHS[r["path"]].bf16]
        line["max rel diff, strict-fp32 paths"] = max(diffs) if diffs else float("nan")
        dflt = next((r for r in rows if r["size"] == size and r["path"] == "fast_default"), {})
        line["rel diff fast_default vs release_default"] = dflt.get("max_rel_diff", float("nan"))
        table.append(line)
    cols = ["size"] + [c for p in paths for c in (f"{p} ms", f"{p} MB")] + [
        "speed-up fast vs release", "max rel diff, strict-fp32 paths", "rel diff fast_default vs release_default"]
    return table, cols


def plots(out: Path, inf_rows, train_rows):
    """One figure (plots.png): inference latency and peak memory vs size, training step times."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, key, ylabel in ((axes[0], "ms", "ms per forward (batch 1)"), (axes[1], "peak_MB", "peak allocated MB")):
        drawn = False
        for p in PATHS:
            pts = [(r["size"], r.get(key)) for r in inf_rows if r["path"] == p and isinstance(r.get(key), float)
                   and r.get(key) == r.get(key) and r.get("ms") == r.get("ms")]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p)
                drawn = True
        if drawn:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        ax.set_xlabel("image side (pixels)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"EAMamba inference: {ylabel}")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    specs = sorted({(r["batch"], r["size"]) for r in train_rows}, key=lambda s: s[1])
    paths = [p for p in TRAIN_PATHS if any(r["path"] == p and r.get("ms") == r.get("ms") for r in train_rows)]
    if specs and paths:
        width = 0.8 / len(paths)
        for i, p in enumerate(paths):
            vals = []
            for bsz, size in specs:
                r = next((r for r in train_rows if r["path"] == p and r["batch"] == bsz and r["size"] == size), {})
                vals.append(r.get("ms", float("nan")))
            ax.bar([j + i * width for j in range(len(specs))], vals, width, label=p)
        ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(specs))])
        ax.set_xticklabels([f"{b}×{s}²" for b, s in specs])
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_ylabel("ms per training step (fwd + bwd + AdamW)")
    ax.set_title("EAMamba training step, fp32")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plots.png", dpi=110)
    plt.close(fig)


def env_info(device) -> dict:
    """``harness.profile.environment`` of ``device`` and whether Triton runs in its interpreter."""
    return {**environment(device), "interpret": launch.INTERPRET}
