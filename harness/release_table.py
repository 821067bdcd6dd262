"""``job=release_table``: a published table of the EAMamba release, regenerated from its checkpoints.

The table is data (``table:`` in the experiment config, the format of :mod:`harness.tables`);
what differs from ``job=table`` is how a cell runs: on the release's own test-set layouts
(:mod:`harness.data.release_sets`) through the release's own routes (:mod:`harness.release_eval`),
with the weights read from the release's container. Cell keys used here:

* ``model`` -- a preset (``conf/model``) whose state dict is the release's (``eamamba``);
* ``weights`` -- the checkpoint file, relative to ``checkpoints.root``;
* ``dataset`` -- a release test set (:data:`~harness.data.release_sets.RELEASE_SETS`) under
  ``data.root``;
* ``protocol`` -- the route: ``testpy``, ``matlab_single`` or ``matlab_uint8``;
* ``task`` -- the task's name; a ``conf/task`` file with a Gaussian ``sigma`` sets the test noise.

Y-channel scoring and the quadrant forward follow the release's test configs for the dataset
(RealSR: ``eval_y_only: True``, ``eval_crop_size: 2048``). A cell whose checkpoint or data is
absent is listed as not run with what is missing. Each cell that runs is a stored record (found
again by its config hash, so a re-run only evaluates what changed); ``reports/<experiment>/``
gets ``results.csv``, ``per_image/<cell>.csv`` and ``table.md`` (:func:`harness.tables.write_table_report`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from harness.data.release_sets import RELEASE_SETS, ReleaseTestSet, missing_files
from harness.release_eval import (
    ROUTES,
    evaluate_release,
    load_release_weights,
    route_protocol,
)
from harness.store import Store, config_hash
from harness.tables import (
    Cell,
    cell_row,
    cells_from_config,
    per_image_rows,
    resolve_weights,
    tolerances,
    write_table_report,
)

log = logging.getLogger("eabench.release_table")

# From the release's configs/test/*.yaml: datasets scored on Y, and those run in quadrants.
Y_CHANNEL_SETS = ("RealSR-x2", "RealSR-x3", "RealSR-x4")
QUADRANT_SETS = {"RealSR-x2": 2048, "RealSR-x3": 2048, "RealSR-x4": 2048}
ROUTE_WEIGHTS = {"testpy": "sd_e", "matlab_single": "sd", "matlab_uint8": "sd_e"}


def cell_sigma(cell: Cell) -> float | None:
    """The Gaussian σ of a cell on a clean-only set, from its ``conf/task`` file."""
    from harness.models.registry import CONF_DIR

    if RELEASE_SETS[cell.dataset].kind != "gaussian":
        return None
    path = CONF_DIR / "task" / f"{cell.task}.yaml"
    degradation = OmegaConf.to_container(OmegaConf.load(path)).get("degradation") if path.is_file() else None
    if not degradation or degradation.get("name") != "gaussian_noise":
        raise ValueError(f"cell {cell.id}: {cell.dataset} needs a Gaussian-noise task (conf/task/<task>.yaml with "
                         f"degradation gaussian_noise), got task {cell.task!r}")
    return float(degradation["sigma"])


def missing_for(cell: Cell, cfg: Mapping[str, Any]) -> list[str]:
    """What keeps ``cell`` from running: checkpoint file, test-set files, model preset."""
    from harness.models.registry import MODEL_DIR

    if cell.dataset not in RELEASE_SETS:
        raise ValueError(f"cell {cell.id}: unknown release test set {cell.dataset!r}; known: {', '.join(RELEASE_SETS)}")
    if cell.protocol not in ROUTES:
        raise ValueError(f"cell {cell.id}: protocol {cell.protocol!r} is not a release route {ROUTES}")
    missing = []
    if not (MODEL_DIR / f"{cell.model}.yaml").is_file():
        missing.append(f"model preset {cell.model} (conf/model/{cell.model}.yaml)")
    root = (cfg.get("checkpoints") or {}).get("root")
    if cell.weights is not None and root is None and not Path(str(cell.weights)).is_absolute():
        missing.append(f"checkpoint {cell.weights} (set checkpoints.root=DIR, the folder holding it)")
    else:
        _, absent = resolve_weights(cell, root)
        if absent:
            missing.append(absent.replace("weights file", "checkpoint file"))
    data_root = (cfg.get("data") or {}).get("root")
    if data_root is None:
        missing.append(f"data for {cell.dataset} (set data.root=DIR, the folder the release calls datasets/)")
    else:
        missing += [f"{cell.dataset}: {m}" for m in missing_files(data_root, cell.dataset)]
    return missing


def _checkpoint_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


def run_cell(cfg: Mapping[str, Any], cell: Cell, *, experiment: str) -> dict[str, Any]:
    """Evaluate one present cell (or return its complete stored record); the record has the
    ``metrics`` shape of ``harness.runner`` records (mean, per-image values and names, protocol)."""
    from harness.models import create, preset_meta
    from harness.runner import environment, resolve_device

    path, _ = resolve_weights(cell, (cfg.get("checkpoints") or {}).get("root"))
    data_root = Path(str(cfg["data"]["root"])).expanduser()
    y_channel = cell.dataset in Y_CHANNEL_SETS
    forward = "quadrants" if cell.dataset in QUADRANT_SETS else "whole"
    sigma = cell_sigma(cell)
    device = resolve_device(str((cfg.get("hardware") or {}).get("device", "cpu")))
    identity = {"experiment": experiment, "cell": dataclasses.asdict(cell), "checkpoint": _checkpoint_identity(path),
                "data_root": str(data_root.resolve()), "sigma": sigma, "y_channel": y_channel, "forward": forward,
                "limit": (cfg.get("table") or {}).get("limit"), "device": device.type}
    run_hash = config_hash(identity)
    store = Store(cfg["store_dir"])
    existing = store.finished(run_hash, force=bool(cfg.get("force", False)))
    if existing is not None:
        return existing
    meta = preset_meta(cell.model)
    record: dict[str, Any] = {
        "config_hash": run_hash, "experiment": experiment, "run_name": cell.id, "model": cell.model,
        "family": meta.get("family"), "task": cell.task, "dataset": cell.dataset, "swept": {"cell": cell.id},
        "config": identity, "status": "running", "started_at": time.time(), "environment": environment(device),
        "profile": {"params": meta.get("official_params"), "gmacs": meta.get("official_gflops")},
    }
    t0 = time.perf_counter()
    try:
        model = create(cell.model)
        record["checkpoint"] = load_release_weights(model, path, ROUTE_WEIGHTS[cell.protocol])
        dataset = ReleaseTestSet(data_root, cell.dataset, sigma=sigma)
        record["data"] = dataset.describe()
        out = evaluate_release(model, dataset, cell.protocol, y_channel=y_channel, forward=forward,
                               crop_size=QUADRANT_SETS.get(cell.dataset, 2048), device=device,
                               limit=(cfg.get("table") or {}).get("limit"))
        protocol = route_protocol(cell.protocol, y_channel)
        record["metrics"] = {m: {"mean": sum(out[m]) / len(out[m]) if out[m] else float("nan"), "values": out[m],
                                 "names": out["names"], "protocol": {**protocol[m], "route": cell.protocol,
                                                                      "weights": protocol["weights"],
                                                                      "forward": forward}}
                             for m in ("psnr", "ssim")}
        record["timings"] = {"eval_s": out["time_s"]}
        record["nonfinite"] = out["nonfinite"]
        if out["nonfinite"]:
            raise FloatingPointError(f"non-finite output on {len(out['nonfinite'])} images ({out['nonfinite'][:5]})")
        record["status"] = "ok"
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - one bad cell must not stop the table
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
    record.setdefault("timings", {})["total_s"] = time.perf_counter() - t0
    record["finished_at"] = time.time()
    store.put(record)
    return record


def run_release_table_job(cfg: Mapping[str, Any], *, experiment: str) -> dict[str, Any]:
    """Every cell of ``cfg['table']``: run what is present, list the rest, write the report."""
    table = cfg.get("table")
    if not table:
        raise ValueError("job=release_table needs a 'table:' section in the experiment config")
    cells = cells_from_config(table)
    tol = tolerances(table)
    out_dir = Path(cfg.get("report_dir") or f"reports/{experiment}")
    rows, per_image = [], {}
    t0 = time.perf_counter()
    for cell in cells:
        missing = missing_for(cell, cfg)
        if missing:
            log.info("%s: not run (missing %s)", cell.id, "; ".join(missing))
            rows.append(cell_row(cell, None, missing, tol))
            continue
        record = run_cell(cfg, cell, experiment=experiment)
        row = cell_row(cell, record, [], tol)
        expected = RELEASE_SETS[cell.dataset].expected
        if row["images"] is not None and row["images"] != expected:  # a partial set is not the paper's number
            row["note"] = f"{row['note']} {row['images']} of the release's {expected} images".strip()
        rows.append(row)
        per_image[cell.id] = per_image_rows(record, None)
        log.info("%s: %s psnr %s (published %s)", cell.id, row["status"], row["psnr"], cell.published_psnr)
    command = cfg.get("command") or (f"python run.py {' '.join(sys.argv[1:])}".strip()
                                     if Path(sys.argv[0]).name == "run.py" else None)
    write_table_report(cells, rows, per_image, out_dir, table, command=command)
    write_release_report(cells, rows, out_dir, table, command)
    status = "ok" if all(r["status"] in ("ok", "not run") for r in rows) else "failed"
    return {"status": status, "run_name": f"table {experiment}", "experiment": experiment, "metrics": {},
            "cells": len(rows), "cells_run": sum(r["status"] == "ok" for r in rows),
            "cells_not_run": sum(r["status"] == "not run" for r in rows), "report_dir": str(out_dir),
            "time_s": time.perf_counter() - t0}


ROUTE_TEXT = {
    "testpy": "`test.py`: EMA weights (`model/sd_e`), the LQ reflect-padded to a multiple of 8, one forward (RealSR: "
              "four overlapping quadrants, `eval_crop_size: 2048`), output cropped and clipped, float PSNR and "
              "per-channel SSIM (valid region, then 5 px more cropped), RGB or Y (RealSR), no border crop.",
    "matlab_single": "`gen_sidd_mat.py` + `evaluate_SIDD.m`: the non-EMA weights (`model/sd`), each 256² block in "
                     "one forward, float32 output clipped; MATLAB `psnr` (one MSE over all channels) and `ssim` "
                     "(volumetric: 11×11×11 Gaussian over rows, columns and channels, replicate padding).",
    "matlab_uint8": "`gen_deblur_png.py` + `evaluate_gopro_hide.m`: EMA weights, reflect padding to a multiple of 8, "
                    "output written as 8-bit PNG (`img_as_ubyte`), MATLAB `psnr`/`ssim` of the uint8 images.",
}


def write_release_report(cells, rows, out_dir: Path, table: Mapping[str, Any], command: str | None) -> None:
    """report.md (what ran, by which route, what is missing) and a figure of ours against published."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_ok = sum(r["status"] == "ok" for r in rows)
    n_not = sum(r["status"] == "not run" for r in rows)
    labels = [f"{c.dataset} {c.column if c.column.startswith('σ') else ''}".strip() for c in cells]
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    x = list(range(len(cells)))
    ax.scatter(x, [r["published_psnr"] for r in rows], facecolors="none", edgecolors="k", label="published (README)")
    ours = [(i, r["psnr"]) for i, r in enumerate(rows) if r["psnr"] is not None]
    if ours:
        ax.scatter(*zip(*ours), color="tab:red", marker="x", label="ours (this harness)")
    ax.set_xticks(x, labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"EAMamba release: {n_ok} of {len(cells)} cells evaluated, {n_not} not run (files missing)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "psnr_ours_vs_published.png", dpi=120)
    plt.close(fig)
    lines = [f"# Report: {table.get('title', 'EAMamba release results')}", ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    summary = (f"{len(cells)} cells: {n_ok} evaluated, {n_not} not run, {len(cells) - n_ok - n_not} failed. The grid "
               "with ours / published (Δ) is `table.md`; one row per cell in `results.csv`; per-image values in "
               "`per_image/<cell>.csv`.")
    lines += [summary, "", "## Routes (the release's own evaluation scripts)", ""]
    for route in ROUTES:
        used = sorted({c.dataset for c in cells if c.protocol == route})
        if used:
            lines.append(f"- **{route}** ({', '.join(used)}): {ROUTE_TEXT[route]}")
    noise = ("Test noise for the Gaussian sets: `torch.manual_seed(2454)` before each image, N(0, 1) of the padded "
             "image's shape times σ/255, not clipped. Images are read as `cv2.imread` reads them (DPDD's 16-bit PNGs "
             "keep their high byte). Layouts under `data.root`: `harness/data/release_sets.py`.")
    lines += ["", noise, ""]
    missing = [(c, r) for c, r in zip(cells, rows) if r["status"] != "ok"]
    if missing:
        lines += ["## Not evaluated", "", "| cell | status | missing / error |", "|---|---|---|"]
        lines += [f"| {c.dataset} {c.task} | {r['status']} | {r['missing'] or r['error']} |" for c, r in missing]
        lines.append("")
    lines += ["![PSNR per cell: published and ours](figures/psnr_ours_vs_published.png)", "",
              "*PSNR per cell: the release README's value (circle) and ours where evaluated (cross).*", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
