"""The report of an ablation study (``job: study`` records): one row per variant over its seeds.

``write_study_report(store_dir, experiment, out_dir)`` reads every record of the experiment
(so records added by later calls, other machines or more seeds are aggregated together) and
writes ``results.csv`` (per variant), ``runs.csv`` (per run), ``table.md``, ``table.tex``,
``report.md`` and ``figures/*.png``. Differences to the reference variant are paired: the
same test images (fixed noise) and the same training seeds, with a bootstrap over images and
seeds (:func:`paired_bootstrap_seeds`). The claims section is written from those intervals.

``python -m harness.report.study ablation_gray25 --store reports/ablation_gray25``
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback

from harness.report import to_latex, to_markdown
from harness.store import Store

log = logging.getLogger("eabench.report")

# "≈" claims hold when the whole 95 % interval of the difference lies within ± this many dB.
EQUIVALENCE_DB = 0.05


def paired_bootstrap_seeds(a: Mapping[Any, Sequence[float]], b: Mapping[Any, Sequence[float]], *,
                           n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Mean of a - b over the seeds both have and their images, with a two-level bootstrap CI.

    ``a``/``b`` map a training seed to per-image values on the same images in the same order.
    Each bootstrap draw resamples the common seeds and, independently, the images (both with
    replacement) and averages the paired differences of that draw, so the interval covers the
    spread from the choice of test images and from training randomness. One seed gives the
    usual bootstrap over images.
    """
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        raise ValueError(f"no common seed to pair: {sorted(a, key=str)} vs {sorted(b, key=str)}")
    rows = []
    for s in seeds:
        x, y = np.asarray(a[s], dtype=np.float64), np.asarray(b[s], dtype=np.float64)
        if x.shape != y.shape or x.size == 0:
            raise ValueError(f"seed {s}: paired values need equal non-empty lengths, got {x.size} and {y.size}")
        rows.append(x - y)
    if len({r.size for r in rows}) != 1:
        raise ValueError("every seed must have the same images")
    diff = np.stack(rows)  # (seeds, images)
    n_s, n_i = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // (n_s * n_i))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        si = rng.integers(0, n_s, size=(m, n_s))
        ii = rng.integers(0, n_i, size=(m, n_i))
        means[start:start + m] = diff[si[:, :, None], ii[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean_diff": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "seeds": n_s,
            "images": n_i, "resolved": bool(lo > 0 or hi < 0)}


def _ok_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and r.get("tests") and r.get("variant")]


def _per_seed(records: list[dict], test: str, metric: str = "psnr") -> dict[str, dict[Any, list[float]]]:
    """{variant: {seed: per-image values}} on one test set (images checked to be in one order)."""
    out: dict[str, dict[Any, list[float]]] = defaultdict(dict)
    names: list[str] | None = None
    for r in records:
        m = ((r["tests"].get(test) or {}).get("metrics") or {}).get(metric)
        if not m:
            continue
        if names is None:
            names = m["names"]
        elif m["names"] != names:
            raise ValueError(f"{r['run_name']}: {test} images differ from the other runs' "
                             f"({len(m['names'])} vs {len(names)}); rerun with the same test sets")
        out[r["variant"]][r["seed"]] = m["values"]
    return out


def variant_table(records: list[dict], reference: str) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Per-variant aggregation and {test: {variant: bootstrap result vs reference}}."""
    ok = _ok_records(records)
    tests = list(ok[0]["tests"]) if ok else []
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        by_variant[r["variant"]].append(r)
    deltas: dict[str, dict] = {}
    per_seed = {t: _per_seed(ok, t) for t in tests}
    for t in tests:
        ref = per_seed[t].get(reference)
        deltas[t] = {}
        for v, vals in per_seed[t].items():
            if ref is not None and v != reference and set(vals) & set(ref):
                deltas[t][v] = paired_bootstrap_seeds(vals, ref)
    rows = []
    for v, runs in by_variant.items():
        first = runs[0]
        prof = first.get("profile") or {}
        row = {"variant": v, "model": first.get("model"), "family": first.get("family"), "seeds": len(runs),
               "params": prof.get("params"), "gmacs": prof.get("gmacs"),
               "ms_per_step": float(np.mean([(r.get("train") or {}).get("ms_per_step", np.nan) for r in runs])),
               "train_s": float(np.mean([(r.get("timings") or {}).get("train_s", np.nan) for r in runs])),
               "wall_s": float(np.mean([(r.get("timings") or {}).get("total_s", np.nan) for r in runs])),
               "device": (first.get("environment") or {}).get("device")}
        for t in tests:
            for m in ("psnr", "ssim"):
                vals = [r["tests"][t]["metrics"][m]["mean"] for r in runs if m in r["tests"].get(t, {}).get("metrics", {})]
                row[f"{t}_{m}_mean"] = float(np.mean(vals)) if vals else np.nan
                row[f"{t}_{m}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else np.nan
            d = deltas.get(t, {}).get(v)
            row[f"{t}_dpsnr"] = d["mean_diff"] if d else (0.0 if v == reference else np.nan)
            row[f"{t}_dpsnr_lo"] = d["ci_low"] if d else np.nan
            row[f"{t}_dpsnr_hi"] = d["ci_high"] if d else np.nan
            row[f"{t}_resolved"] = d["resolved"] if d else None
        ratios = [(r.get("erf") or {}).get("area_ratios") or {} for r in runs]
        for key in sorted({k for rr in ratios for k in rr}, key=float):
            row[f"erf_area@{key}"] = float(np.mean([rr[key] for rr in ratios if key in rr]))
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        order = {v: i for i, v in enumerate(_variant_order(records))}
        df = df.sort_values("variant", key=lambda s: s.map(lambda v: order.get(v, len(order)))).reset_index(drop=True)
    return df, deltas


def _variant_order(records: list[dict]) -> list[str]:
    """The variants in the order the study config lists them (else first seen)."""
    for r in records:
        variants = (((r.get("config") or {}).get("study") or {}).get("variants")) or r.get("study_variants")
        if variants:
            return list(variants)
    seen: list[str] = []
    for r in records:
        if r.get("variant") and r["variant"] not in seen:
            seen.append(r["variant"])
    return seen


def _pm(mean: float, std: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None or math.isnan(std) else f" ± {std:.{digits}f}")


def display_table(df: pd.DataFrame, tests: list[str], reference: str) -> pd.DataFrame:
    out = pd.DataFrame({"variant": df["variant"], "seeds": df["seeds"],
                        "params (M)": df["params"] / 1e6, "GMACs": df["gmacs"],
                        "ms/step": df["ms_per_step"], "wall (s)": df["wall_s"]})
    for t in tests:
        out[f"{t} PSNR"] = [_pm(m, s, 2) for m, s in zip(df[f"{t}_psnr_mean"], df[f"{t}_psnr_std"])]
        out[f"{t} SSIM"] = [_pm(m, s, 4) for m, s in zip(df[f"{t}_ssim_mean"], df[f"{t}_ssim_std"])]
        cells = []
        for v, d, lo, hi, res in zip(df["variant"], df[f"{t}_dpsnr"], df[f"{t}_dpsnr_lo"], df[f"{t}_dpsnr_hi"],
                                     df[f"{t}_resolved"]):
            if v == reference:
                cells.append("reference")
            elif d is None or math.isnan(d):
                cells.append("-")
            else:
                cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if res else ""))
        out[f"{t} ΔPSNR [95% CI]"] = cells
    for c in [c for c in df.columns if c.startswith("erf_area@")]:
        out[c.replace("erf_area@", "ERF area @")] = [f"{v:.3g}" if pd.notna(v) else "-" for v in df[c]]
    return out


def _protocol(records: list[dict]) -> dict[str, Any]:
    r = records[0]
    cfg = r.get("config") or {}
    train, task, data = cfg.get("train") or {}, cfg.get("task") or {}, cfg.get("data") or {}
    env = r.get("environment") or {}
    tests = list((data.get("tests") or {}))
    return {"train": train, "task": task, "tests": tests, "train_set": Path(str((data.get("train") or {}).get(
        "folder", "?"))).name, "val": (data.get("val") or {}).get("name"), "eval": cfg.get("eval") or {},
        "device": env.get("device"), "torch": env.get("torch"), "cpu": env.get("cpu"),
        "test_seed": (next(iter((data.get("tests") or {}).values()), {}) or {}).get("seed")}


def protocol_text(p: Mapping[str, Any]) -> str:
    t, noise = p["train"], (p["task"].get("degradation") or {})
    return (f"Grey Gaussian denoising, σ = {noise.get('sigma')} (task `{p['task'].get('name')}`). Training on "
            f"{p['train_set']}: {t.get('iters')} iterations, batch {t.get('batch_size')}, random {t.get('patch_size')}² "
            f"patches with 8-way flips/rotations and noise drawn afresh per patch; {t.get('loss')} loss, AdamW "
            f"(lr {t.get('lr')}, betas {t.get('betas')}, weight decay {t.get('weight_decay')}), {t.get('schedule')} "
            f"schedule with {t.get('warmup_iters', 0)} warm-up steps to {t.get('eta_min')}, gradient clipping "
            f"{t.get('grad_clip')}, EMA {t.get('ema')}, precision {t.get('precision')}. Validation: {p['val']} PSNR "
            f"every {t.get('val_every')} steps, logged for the learning curves only (nothing is selected; the "
            f"final weights are tested). Test: {', '.join(p['tests'])} with fixed noise (seed {p['test_seed']}), "
            f"{p['eval'].get('protocol')} protocol (uint8 rounding, crop {p['eval'].get('crop_border', 0)}). "
            f"Every variant has the same budget and settings; only the model changes.")


def _delta(per_seed: dict, a: str, b: str) -> dict | None:
    if a not in per_seed or b not in per_seed or not set(per_seed[a]) & set(per_seed[b]):
        return None
    return paired_bootstrap_seeds(per_seed[a], per_seed[b])


def _interval(d: Mapping[str, Any]) -> str:
    return f"{d['mean_diff']:+.3f} dB [95 % CI {d['ci_low']:+.3f}, {d['ci_high']:+.3f}; {d['seeds']} seeds × {d['images']} images]"


def _verdict_greater(d: Mapping[str, Any]) -> str:
    if d["ci_low"] > 0:
        return "holds"
    if d["ci_high"] < 0:
        return "is reversed"
    return "is not resolved at this scale"


def _verdict_equal(d: Mapping[str, Any], margin: float = EQUIVALENCE_DB) -> str:
    if -margin <= d["ci_low"] and d["ci_high"] <= margin:
        return f"holds (the interval lies within ±{margin} dB)"
    if d["ci_low"] > margin or d["ci_high"] < -margin:
        return f"does not hold (the interval lies outside ±{margin} dB)"
    return f"is not resolved (the interval crosses ±{margin} dB)"


def claims(records: list[dict], df: pd.DataFrame, test: str) -> list[str]:
    """The paper's claims checked on ``test``, one sentence each, from the computed intervals."""
    ok = _ok_records(records)
    per_seed = _per_seed(ok, test)
    gm = dict(zip(df["variant"], df["gmacs"]))
    lines = []

    def cost(a: str, b: str) -> str:
        if gm.get(a) and gm.get(b):
            return f" at {gm[a]:.2f} vs {gm[b]:.2f} GMACs ({gm[a] / gm[b]:.2f}×)"
        return ""

    for concat, add in (("cross", "add_cross"), ("all_around", "add_all_around")):
        d = _delta(per_seed, concat, add)
        if d:
            lines.append(f"- MHSSM ≈ 2D-SS quality at lower cost ({concat} with concat vs add){cost(concat, add)}: "
                         f"ΔPSNR concat − add = {_interval(d)}; the equivalence claim {_verdict_equal(d)}.")
    d = _delta(per_seed, "all_around", "cross")
    if d:
        lines.append(f"- All-around > cross: ΔPSNR = {_interval(d)}; the claim {_verdict_greater(d)}.")
    for route, ladder in (("all_around", ["all_around", "heads16", "heads32"]),
                          ("raster", ["raster", "raster_heads2", "raster_heads4", "raster_heads8"])):
        present = [v for v in ladder if v in per_seed]
        for fewer, more in zip(present, present[1:]):
            d = _delta(per_seed, more, fewer)
            if d:
                lines.append(f"- More heads at the same width help ({route}: {more} vs {fewer}): "
                             f"ΔPSNR = {_interval(d)}; the claim {_verdict_greater(d)}.")
    for base in ("dncnn", "nafnet", "restormer", "mambair"):
        d = _delta(per_seed, "all_around", base)
        if d:
            lines.append(f"- EAMamba (all-around) > {base} at equal budget{cost('all_around', base)}: "
                         f"ΔPSNR = {_interval(d)}; the claim {_verdict_greater(d)}.")
    return lines


def _figures(records: list[dict], df: pd.DataFrame, tests: list[str], fig_dir: Path, caption: str
             ) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, str]] = []
    t0 = tests[0]

    def save(fig, name: str, text: str) -> None:
        fig.text(0.01, 0.005, caption, fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(fig_dir / name, dpi=130)
        plt.close(fig)
        out.append((name, text))

    for xcol, xlabel, name in (("gmacs", "GMACs (multiply-adds) at 1×1×256×256", "psnr_vs_gmacs.png"),
                               ("train_s", "training time per run (s, mean over seeds)", "psnr_vs_train_time.png")):
        if df[xcol].notna().any():
            fig, ax = plt.subplots(figsize=(6.8, 4.6))
            for _, row in df.iterrows():
                ax.errorbar(row[xcol], row[f"{t0}_psnr_mean"], yerr=0 if math.isnan(row[f"{t0}_psnr_std"])
                            else row[f"{t0}_psnr_std"], fmt="o", ms=5, capsize=3,
                            color="tab:blue" if row["family"] == "eamamba" else "tab:orange")
                ax.annotate(row["variant"], (row[xcol], row[f"{t0}_psnr_mean"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{t0} PSNR (dB), mean ± std over seeds")
            ax.set_title(f"{t0} PSNR vs {xcol} (blue: EAMamba variants, orange: baselines)", fontsize=9)
            ax.grid(alpha=0.3)
            save(fig, name, f"{t0} PSNR against {xlabel}.")
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _ok_records(records):
        for h in (r.get("train") or {}).get("history") or []:
            if "val_psnr" in h:
                curves[r["variant"]][int(h["iter"])].append(float(h["val_psnr"]))
    if curves:
        fig, ax = plt.subplots(figsize=(7.4, 4.8))
        cmap = plt.get_cmap("tab20")
        for i, v in enumerate(df["variant"]):
            if v not in curves:
                continue
            its = sorted(curves[v])
            ax.plot(its, [np.mean(curves[v][i2]) for i2 in its], marker=".", lw=1.2, color=cmap(i % 20), label=v)
        ax.set_xlabel("training iteration")
        val = _protocol(records)["val"]
        ax.set_ylabel(f"{val} PSNR (dB), mean over seeds")
        ax.set_title("Learning curves (logged validation, not used for selection)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        save(fig, "learning_curves.png", f"Validation ({val}) PSNR against iteration.")
    maps: dict[str, np.ndarray] = {}
    root = Path(records[0].get("_store_root", "."))
    for v in df["variant"]:
        arrays = []
        for r in _ok_records(records):
            f = (r.get("erf") or {}).get("file")
            if r["variant"] == v and f and (root / f).is_file():
                with np.load(root / f) as z:
                    arrays.append(z["erf"].astype(np.float64))
        if arrays:
            maps[f"{v} ({len(arrays)} seeds)"] = np.mean(arrays, axis=0)
    if maps:
        from harness.erf import erf_grid

        erf_grid(maps, fig_dir / "erf_trained.png", "power0.25", ncols=min(6, len(maps)), caption=caption)
        out.append(("erf_trained.png", "ERF of the trained models (maps averaged over seeds), area ratios of "
                    "the raw maps."))
    return out


def write_study_report(store_dir: str | Path, experiment: str, out_dir: str | Path,
                       reference: str | None = None) -> Path:
    """Render ``out_dir`` from every record of ``experiment`` in ``store_dir``."""
    records = Store(store_dir).records(experiment)
    for r in records:
        r["_store_root"] = str(store_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = _ok_records(records)
    if not ok:
        (out / "report.md").write_text(f"# {experiment}\n\nNo completed study runs in {store_dir} "
                                       f"({len(records)} records).\n")
        return out
    reference = reference or ((ok[0].get("config") or {}).get("study") or {}).get("reference") or "all_around"
    df, _ = variant_table(records, reference)
    tests = list(ok[0]["tests"])
    df.to_csv(out / "results.csv", index=False)
    run_rows = []
    for r in records:
        row = {"variant": r.get("variant"), "seed": r.get("seed"), "status": r.get("status"),
               "config_hash": r.get("config_hash"), "ms_per_step": (r.get("train") or {}).get("ms_per_step"),
               "train_s": (r.get("timings") or {}).get("train_s"), "wall_s": (r.get("timings") or {}).get("total_s"),
               "device": (r.get("environment") or {}).get("device"), "error": r.get("error")}
        for t in tests:
            for m in ("psnr", "ssim"):
                row[f"{t}_{m}"] = (((r.get("tests") or {}).get(t) or {}).get("metrics") or {}).get(m, {}).get("mean")
        run_rows.append(row)
    pd.DataFrame(run_rows).to_csv(out / "runs.csv", index=False)
    p = _protocol(ok)
    devices = sorted({str((r.get("environment") or {}).get("device")) for r in ok})
    caption = (f"{experiment}: σ {(p['task'].get('degradation') or {}).get('sigma')}, {p['train'].get('iters')} it × "
               f"{p['train'].get('batch_size')} × {p['train'].get('patch_size')}²; {', '.join(devices)}, "
               f"torch {p['torch']}")
    table = display_table(df, tests, reference)
    (out / "table.md").write_text(to_markdown(table))
    (out / "table.tex").write_text(to_latex(table, caption))
    figures = _figures(records, df, tests, out / "figures", caption)
    failed = [r for r in records if r.get("status") != "ok"]
    lines = [f"# Ablation study: {experiment}", "",
             f"{len(ok)} completed runs of {df.shape[0]} variants ({len(failed)} failed); reference variant "
             f"`{reference}`. Hardware: {', '.join(devices)} (torch {p['torch']}).", "",
             "## Protocol", "", protocol_text(p), "",
             "## Results", "", to_markdown(table), "",
             f"PSNR/SSIM: mean ± std over seeds of each run's mean over the set. ΔPSNR: paired difference to "
             f"`{reference}` on the same images and training seeds, mean and 95 % bootstrap interval over "
             f"images and seeds (`*`: the interval excludes 0, the difference is resolved). ms/step: training "
             f"time without validation per step; wall: the whole run (profile, training, validation, tests, ERF), "
             f"with other runs possibly sharing the GPU.", ""]
    for t in tests:
        lines += [f"## The paper's claims at this scale ({t})", ""]
        lines += claims(records, df, t) or ["- (the variants needed for the claims have no completed runs yet)"]
        lines += [""]
    for r in failed:
        lines.append(f"- **failed** `{r.get('run_name')}`: {r.get('error')}")
    for name, text in figures:
        lines += ["", f"![{text}](figures/{name})", "", f"*{text}*"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out


class StudyReportCallback(Callback):
    """Hydra callback: render the study report when a run or sweep ends (a failure is logged only)."""

    def _write(self, config) -> None:
        try:
            if config.get("report", True):
                log.info("report written to %s",
                         write_study_report(config.store_dir, config.experiment_name, config.report_dir))
        except Exception as err:  # noqa: BLE001 - a report failure must not lose the runs
            log.error("study report failed: %s: %s (re-render with python -m harness.report.study)",
                      type(err).__name__, err)

    def on_run_end(self, config, **kwargs: Any) -> None:
        self._write(config)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self._write(config)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render an ablation study's report from its records.")
    parser.add_argument("experiment")
    parser.add_argument("--store", default=None, help="store directory (default reports/<experiment>)")
    parser.add_argument("--out", default=None, help="report folder (default reports/<experiment>)")
    parser.add_argument("--reference", default=None, help="variant the ΔPSNR are taken against")
    args = parser.parse_args(argv)
    store = args.store or f"reports/{args.experiment}"
    print(write_study_report(store, args.experiment, args.out or f"reports/{args.experiment}", args.reference))


if __name__ == "__main__":
    main()
