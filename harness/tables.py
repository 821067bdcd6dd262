"""Published tables, regenerated: every cell evaluated through the ordinary run path and shown as
ours / published / Δ.

A table is data in an experiment config (``table:``): sections of cells, each cell naming a model
preset, the weights file it loads, a dataset, a task, a scoring protocol and the published
numbers with their source. ``run_table_job`` composes each cell's run configuration from the
config groups (``conf/model``, ``conf/task``, ``conf/data/benchmark.yaml``, ``conf/eval``), runs
it with :func:`harness.runner.run_job` (so every cell is an ordinary stored, timed record) and
writes ``reports/<experiment>/``:

* ``results.csv`` -- one row per cell: ``section, row, column, model, weights, dataset, task,
  protocol, psnr, ssim, published_psnr, published_ssim, delta_psnr, delta_ssim, flag, status,
  missing, error, images, eval_s, source, note, config_hash``;
* ``per_image/<cell>.csv`` -- per-image PSNR/SSIM of every cell that ran, with the image's
  degradation seed;
* ``table.md`` -- each section as a grid of ``ours / published (Δ)``, cells outside the
  tolerance flagged, the causes written in the config, the cells not run with what is missing.

A cell whose weights, data, model preset or Python package are absent is never dropped: its row
says ``status = not run`` and ``missing`` names what to provide. Config layout::

    weights: {root: /path/to/weights}      # the folder cells' ``weights`` are relative to
    table:
      title: ...
      tolerance: {psnr: 0.05, ssim: 0.002}
      metrics: [psnr, ssim]
      sections:
        - name: bsd68
          title: BSD68, grey AWGN
          source: cszn/DnCNN README
          dataset: BSD68                   # section-level defaults for its cells
          cells:
            - {row: "σ=15", column: DnCNN-S, model: dncnn_gray17, weights: dncnn_s_sigma15.mat,
               task: denoise_gray15, psnr: 31.73, note: "why a miss is expected"}

Cell keys: ``row``, ``column``, ``model``, ``task``, ``dataset``, ``weights`` (null: the model
has none), ``protocol`` (a ``conf/eval`` file: basicsr, float, eamamba), ``psnr``/``ssim``
(published), ``source``, ``note``, ``requires`` (Python packages), ``overrides`` (dotted config
keys, e.g. ``{eval.limit: 2}``), ``per_image`` (also print its per-image table).
``table.evaluate: false`` renders the report from stored records only (cells without one are
listed as not run), e.g. while another process is still evaluating.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from harness.models.registry import CONF_DIR, MODEL_DIR

log = logging.getLogger("eabench.tables")

CELL_KEYS = {"row", "column", "model", "task", "dataset", "weights", "protocol", "psnr", "ssim", "source",
             "note", "requires", "overrides", "per_image", "id"}
SECTION_KEYS = {"name", "title", "source", "dataset", "protocol", "model", "task", "weights", "requires", "cells",
                "note", "overrides"}
CSV_COLUMNS = ("section", "row", "column", "model", "weights", "dataset", "task", "protocol", "psnr", "ssim",
               "published_psnr", "published_ssim", "delta_psnr", "delta_ssim", "flag", "status", "missing",
               "error", "images", "eval_s", "source", "note", "config_hash")


class TableConfigError(ValueError):
    """A table config that cannot be read (unknown key, missing field); the message names it."""


@dataclass
class Cell:
    """One published number to regenerate."""

    id: str
    section: str
    row: str
    column: str
    model: str
    task: str
    dataset: str
    weights: str | None = None
    protocol: str = "basicsr"
    published_psnr: float | None = None
    published_ssim: float | None = None
    source: str = ""
    note: str = ""
    requires: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    per_image: bool = False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def cells_from_config(table: Mapping[str, Any]) -> list[Cell]:
    """Cells of a ``table:`` config, section defaults filled in; ids are unique."""
    sections = table.get("sections")
    if not sections:
        raise TableConfigError("table: needs a non-empty 'sections' list")
    cells: list[Cell] = []
    seen: set[str] = set()
    for s_index, section in enumerate(sections):
        section = dict(section)
        unknown = set(section) - SECTION_KEYS
        if unknown:
            raise TableConfigError(f"table section {s_index}: unknown key(s) {sorted(unknown)}; valid: "
                                   f"{sorted(SECTION_KEYS)}")
        s_name = str(section.get("name") or f"section{s_index}")
        for c_index, raw in enumerate(section.get("cells") or []):
            raw = dict(raw)
            unknown = set(raw) - CELL_KEYS
            if unknown:
                raise TableConfigError(f"table section {s_name!r} cell {c_index}: unknown key(s) {sorted(unknown)}; "
                                       f"valid: {sorted(CELL_KEYS)}")
            merged = {k: section[k] for k in ("dataset", "protocol", "model", "task", "weights", "source", "requires")
                      if k in section}
            merged.update(raw)
            for key in ("model", "task", "dataset"):
                if not merged.get(key):
                    raise TableConfigError(f"table section {s_name!r} cell {c_index}: no {key!r} (set it on the cell "
                                           "or the section)")
            row, column = str(merged.get("row", c_index)), str(merged.get("column", merged["model"]))
            cell_id = str(merged.get("id") or _slug(f"{s_name}__{row}__{column}"))
            if cell_id in seen:
                raise TableConfigError(f"table: two cells share the id {cell_id!r} (section {s_name!r}); give "
                                       "them distinct row/column or an explicit id")
            seen.add(cell_id)
            overrides = {**dict(section.get("overrides") or {}), **dict(merged.get("overrides") or {})}
            cells.append(Cell(
                id=cell_id, section=s_name, row=row, column=column, model=str(merged["model"]),
                task=str(merged["task"]), dataset=str(merged["dataset"]), weights=merged.get("weights"),
                protocol=str(merged.get("protocol", "basicsr")),
                published_psnr=_opt_float(merged.get("psnr")), published_ssim=_opt_float(merged.get("ssim")),
                source=str(merged.get("source") or section.get("source") or ""), note=str(merged.get("note") or ""),
                requires=list(merged.get("requires") or []), overrides=overrides,
                per_image=bool(merged.get("per_image", False))))
    return cells


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def resolve_weights(cell: Cell, weights_root: str | Path | None) -> tuple[Path | None, str | None]:
    """(path, None) for a present weights file; (None, what is missing) otherwise; (None, None) for a
    cell without weights.

    ``cell.weights`` is a name of the weights registry (:data:`harness.weights.WEIGHTS`; its file is
    looked for in ``weights_root`` and in its direct subfolders), a path relative to
    ``weights_root``, or an absolute path."""
    if cell.weights is None:
        return None, None
    from harness.weights import WEIGHTS

    entry = WEIGHTS.get(str(cell.weights))
    name = entry.file if entry is not None else str(cell.weights)
    path = Path(name).expanduser()
    if path.is_absolute():
        return (path, None) if path.is_file() else (None, f"weights file {path}")
    fetch = f"; python -m harness.weights fetch {cell.weights} --dir DIR" if entry is not None else ""
    if weights_root is None:
        return None, f"weights {name} (set weights.root=DIR, the folder holding it{fetch})"
    root = Path(weights_root).expanduser()
    for candidate in [root / path, *sorted(root.glob(f"*/{path}"))]:
        if candidate.is_file():
            return candidate, None
    return None, f"weights file {name} in weights.root={root} or its subfolders{fetch}"


def missing_for(cell: Cell, cfg: Mapping[str, Any]) -> tuple[list[str], Any]:
    """What keeps ``cell`` from running (preset, task, package, weights, data); and its test
    dataset when the data is present (used for per-image seeds)."""
    missing: list[str] = []
    if not (MODEL_DIR / f"{cell.model}.yaml").is_file():
        missing.append(f"model preset {cell.model} (conf/model/{cell.model}.yaml)")
    if not (CONF_DIR / "task" / f"{cell.task}.yaml").is_file():
        missing.append(f"task {cell.task} (conf/task/{cell.task}.yaml)")
    if not (CONF_DIR / "eval" / f"{cell.protocol}.yaml").is_file():
        missing.append(f"protocol {cell.protocol} (conf/eval/{cell.protocol}.yaml)")
    for package in cell.requires:
        if importlib.util.find_spec(package) is None:
            missing.append(f"Python package {package} (pip install -e .[classical])"
                           if package == "bm3d" else f"Python package {package}")
    _, weights_missing = resolve_weights(cell, (cfg.get("weights") or {}).get("root"))
    if weights_missing:
        missing.append(weights_missing)
    dataset = None
    root = (cfg.get("data") or {}).get("root")
    if not missing and root is None:
        missing.append(f"dataset {cell.dataset} (set data.root=DIR, the folder holding the test sets; "
                       f"python -m harness.data fetch {cell.dataset} --root DIR)")
    if not missing:
        try:
            from harness.data import build_dataset

            spec = cell_config(cfg, cell)["data"]["test"]
            task = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "task" / f"{cell.task}.yaml"))
            dataset = build_dataset({**spec, "degradation": task.get("degradation"), "seed": cfg.get("seed", 0)})
        except (FileNotFoundError, KeyError, ValueError) as err:
            missing.append(f"dataset {cell.dataset} under data.root={root} ({err})")
    return missing, dataset


def cell_config(base: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
    """The full run configuration of ``cell``: ``base`` (the composed experiment config: seed,
    hardware, store, profile, train) with model, task, data and eval taken from their groups."""
    cfg = OmegaConf.create({k: v for k, v in copy.deepcopy(dict(base)).items()
                            if k not in ("model", "task", "data", "eval", "table", "hydra")})
    OmegaConf.set_struct(cfg, False)
    cfg.model = OmegaConf.load(MODEL_DIR / f"{cell.model}.yaml")
    cfg.task = OmegaConf.load(CONF_DIR / "task" / f"{cell.task}.yaml")
    cfg.data = OmegaConf.load(CONF_DIR / "data" / "benchmark.yaml")
    cfg.data.root = str((base.get("data") or {}).get("root"))
    cfg.data.name = cell.dataset
    cfg.eval = OmegaConf.load(CONF_DIR / "eval" / f"{cell.protocol}.yaml")
    cfg.eval.metrics = list((base.get("table") or {}).get("metrics") or ["psnr", "ssim"])
    path, _ = resolve_weights(cell, (base.get("weights") or {}).get("root"))
    cfg.checkpoint = str(path) if path is not None else None
    for key, value in cell.overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return OmegaConf.to_container(cfg, resolve=True)


def tolerances(table: Mapping[str, Any]) -> tuple[float, float]:
    """(|ΔPSNR|, |ΔSSIM|) above which a cell is flagged: the table's ``tolerance`` or 0.05 dB / 0.002."""
    tol = dict(table.get("tolerance") or {})
    return float(tol.get("psnr", 0.05)), float(tol.get("ssim", 0.002))


def cell_row(cell: Cell, record: Mapping[str, Any] | None, missing: Sequence[str], tol: tuple[float, float]
             ) -> dict[str, Any]:
    """The results.csv row of a cell (run or not)."""
    row: dict[str, Any] = {
        "section": cell.section, "row": cell.row, "column": cell.column, "model": cell.model,
        "weights": cell.weights, "dataset": cell.dataset, "task": cell.task, "protocol": cell.protocol,
        "psnr": None, "ssim": None, "published_psnr": cell.published_psnr, "published_ssim": cell.published_ssim,
        "delta_psnr": None, "delta_ssim": None, "flag": "", "status": "not run", "missing": "; ".join(missing),
        "error": "", "images": None, "eval_s": None, "source": cell.source, "note": cell.note, "config_hash": None,
    }
    if record is None:
        return row
    metrics = record.get("metrics") or {}
    row.update(status=record.get("status"), error=record.get("error") or "", config_hash=record.get("config_hash"),
               eval_s=(record.get("timings") or {}).get("eval_s"))
    for m in ("psnr", "ssim"):
        if m in metrics:
            row[m] = metrics[m]["mean"]
            row["images"] = len(metrics[m]["values"])
    flags = []
    if row["psnr"] is not None and cell.published_psnr is not None:
        row["delta_psnr"] = row["psnr"] - cell.published_psnr
        if abs(row["delta_psnr"]) > tol[0] + 1e-9:
            flags.append("psnr")
    if row["ssim"] is not None and cell.published_ssim is not None:
        row["delta_ssim"] = row["ssim"] - cell.published_ssim
        if abs(row["delta_ssim"]) > tol[1] + 1e-12:
            flags.append("ssim")
    row["flag"] = ",".join(flags)
    return row


def per_image_rows(record: Mapping[str, Any], dataset: Any) -> list[dict[str, Any]]:
    """Per-image values of a run, with the seed its degradation drew from."""
    metrics = record.get("metrics") or {}
    if not metrics:
        return []
    first = next(iter(metrics.values()))
    rows = []
    for i, name in enumerate(first["names"]):
        row: dict[str, Any] = {"image": name}
        for m, res in metrics.items():
            row[m] = res["values"][i]
        if dataset is not None and getattr(dataset, "degradation", None) is not None:
            row["seed"] = dataset.seed_for(name)
        rows.append(row)
    return rows


def run_table_job(cfg: Mapping[str, Any], *, experiment: str) -> dict[str, Any]:
    """Evaluate every present cell of ``cfg['table']``, write the report, return a summary record."""
    from harness.runner import run_job

    table = cfg.get("table")
    if not table:
        raise TableConfigError("job=table needs a 'table:' section in the experiment config")
    cells = cells_from_config(table)
    tol = tolerances(table)
    out_dir = Path(cfg.get("report_dir") or f"reports/{experiment}")
    evaluate = bool(table.get("evaluate", True))
    rows, per_image = [], {}
    t0 = time.perf_counter()
    for cell in cells:
        missing, dataset = missing_for(cell, cfg)
        if missing:
            log.info("%s: not run (missing %s)", cell.id, "; ".join(missing))
            rows.append(cell_row(cell, None, missing, tol))
            continue
        if evaluate:
            record = run_job(cell_config(cfg, cell), experiment=experiment, model_name=cell.model,
                             swept={"cell": cell.id}, run_name=cell.id)
        else:
            record = stored_record(cell_config(cfg, cell), experiment, cell.id)
            if record is None:
                rows.append(cell_row(cell, None, ["a stored record (table.evaluate=false renders only)"], tol))
                continue
        row = cell_row(cell, record, [], tol)
        rows.append(row)
        per_image[cell.id] = per_image_rows(record, dataset)
        log.info("%s: %s psnr %s (published %s)", cell.id, row["status"], _fmt(row["psnr"]),
                 _fmt(cell.published_psnr))
    write_table_report(cells, rows, per_image, out_dir, table, command=cfg.get("command"))
    n_run = sum(r["status"] == "ok" for r in rows)
    n_flag = sum(bool(r["flag"]) for r in rows)
    status = "ok" if all(r["status"] in ("ok", "not run") for r in rows) else "failed"
    return {"status": status, "run_name": f"table {experiment}", "experiment": experiment,
            "metrics": {}, "cells": len(rows), "cells_run": n_run, "cells_flagged": n_flag,
            "cells_not_run": sum(r["status"] == "not run" for r in rows), "report_dir": str(out_dir),
            "time_s": time.perf_counter() - t0}


def stored_record(cell_cfg: Mapping[str, Any], experiment: str, run_name: str) -> dict[str, Any] | None:
    """The complete record ``run_job`` would return for this configuration without running, or None."""
    from harness.runner import SEMANTIC_KEYS
    from harness.store import Store, config_hash

    store = Store(cell_cfg["store_dir"])
    run_hash = config_hash({"experiment": experiment, **{k: cell_cfg.get(k) for k in SEMANTIC_KEYS}})
    record = store.get(run_hash)
    if record is not None and record.get("status") == "ok":
        return record
    # Settings that do not change a number (e.g. hardware threads) may have changed since the run:
    # fall back to the newest complete record of the same cell with the same model, task, data,
    # protocol and weights.
    same = ("model", "task", "data", "eval", "checkpoint")
    want = {k: cell_cfg.get(k) for k in same}
    found = [r for r in store.records(experiment) if r.get("status") == "ok" and r.get("run_name") == run_name
             and all((r.get("config") or {}).get(k) == v for k, v in want.items())]
    return max(found, key=lambda r: r.get("finished_at") or 0) if found else None


def _fmt(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell_text(row: Mapping[str, Any], tol: tuple[float, float]) -> str:
    if row["status"] == "not run":
        return "not run"
    if row["status"] != "ok":
        return "failed"
    parts = []
    for m, digits in (("psnr", 2), ("ssim", 4)):
        if row[m] is None or (row[f"published_{m}"] is None and m == "ssim"):
            continue
        text = _fmt(row[m], digits)
        if row[f"published_{m}"] is not None:
            mark = " ⚠" if m in row["flag"].split(",") else ""
            text += f" / {_fmt(row[f'published_{m}'], digits)} ({_fmt(row[f'delta_{m}'], digits, True)}){mark}"
        parts.append(text)
    return " · ".join(parts) or "-"


def write_table_report(cells: Sequence[Cell], rows: Sequence[Mapping[str, Any]],
                       per_image: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                       table: Mapping[str, Any], command: str | None = None) -> Path:
    """results.csv, per_image/<cell>.csv and table.md under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    img_dir = out_dir / "per_image"
    for cell_id, images in per_image.items():
        if not images:
            continue
        img_dir.mkdir(exist_ok=True)
        keys = list(dict.fromkeys(k for r in images for k in r))
        with (img_dir / f"{cell_id}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for r in images:
                writer.writerow({k: _csv_value(r.get(k)) for k in keys})
    (out_dir / "table.md").write_text(table_markdown(cells, rows, per_image, table, command))
    return out_dir


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}" if abs(value) < 1 else f"{value:.4f}"
    return "" if value is None else value


def table_markdown(cells: Sequence[Cell], rows: Sequence[Mapping[str, Any]],
                   per_image: Mapping[str, Sequence[Mapping[str, Any]]], table: Mapping[str, Any],
                   command: str | None = None) -> str:
    """Markdown: one grid per section (ours / published (Δ)), flagged cells with their causes,
    cells not run with what is missing, per-image tables where asked."""
    tol = tolerances(table)
    by_id = {c.id: (c, r) for c, r in zip(cells, rows)}
    lines = [f"# {table.get('title', 'Published table, regenerated')}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Each cell: ours / published (Δ); PSNR in dB, SSIM where published. ⚠: |ΔPSNR| > {tol[0]} dB or "
              f"|ΔSSIM| > {tol[1]}. Per-image values: `per_image/<cell>.csv`.", ""]
    sections: dict[str, list[str]] = {}
    for c in cells:
        sections.setdefault(c.section, []).append(c.id)
    titles = {str(s.get("name") or f"section{i}"): s for i, s in enumerate(table.get("sections") or [])}
    for name, ids in sections.items():
        spec = titles.get(name, {})
        lines += [f"## {spec.get('title', name)}", ""]
        if spec.get("source"):
            lines += [f"Published: {spec['source']}.", ""]
        if spec.get("note"):
            lines += [str(spec["note"]), ""]
        row_names = list(dict.fromkeys(by_id[i][0].row for i in ids))
        col_names = list(dict.fromkeys(by_id[i][0].column for i in ids))
        grid = {(by_id[i][0].row, by_id[i][0].column): by_id[i][1] for i in ids}
        lines.append("| | " + " | ".join(col_names) + " |")
        lines.append("|---|" + "---|" * len(col_names))
        for r in row_names:
            cells_text = [(_cell_text(grid[(r, c)], tol) if (r, c) in grid else "") for c in col_names]
            lines.append(f"| {r} | " + " | ".join(cells_text) + " |")
        lines.append("")
    flagged = [(c, r) for c, r in by_id.values() if r["flag"]]
    if flagged:
        lines += ["## Cells outside the tolerance", "", "| cell | Δ PSNR | Δ SSIM | likely cause |", "|---|---|---|---|"]
        for c, r in flagged:
            lines.append(f"| {c.section} · {c.row} · {c.column} | {_fmt(r['delta_psnr'], 2, True)} | "
                         f"{_fmt(r['delta_ssim'], 4, True)} | {c.note or 'not yet explained'} |")
        lines.append("")
    not_run = [(c, r) for c, r in by_id.values() if r["status"] != "ok"]
    if not_run:
        lines += ["## Cells not run", "", "| cell | status | missing / error |", "|---|---|---|"]
        for c, r in not_run:
            lines.append(f"| {c.section} · {c.row} · {c.column} | {r['status']} | {r['missing'] or r['error']} |")
        lines.append("")
    for c, r in by_id.values():
        images = per_image.get(c.id) or []
        if not c.per_image or not images:
            continue
        lines += [f"## Per image: {c.dataset}, {c.task}, {c.column}", "", "| image | PSNR | SSIM | seed |",
                  "|---|---|---|---|"]
        for im in images:
            lines.append(f"| {im['image']} | {_fmt(im.get('psnr'))} | {_fmt(im.get('ssim'), 4)} | {im.get('seed', '-')} |")
        lines.append(f"| average | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 4)} | |")
        lines.append("")
    return "\n".join(lines)
