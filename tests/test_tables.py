"""The published-table machinery (harness.tables) on a tiny table: a present cell runs through the
ordinary run path and is reported as ours / published / Δ with per-image values; absent cells are
listed as not run with what is missing, never dropped."""

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import harness.models as hm
from harness.checkpoints import load_weights
from harness.data import derive_seed
from harness.models.registry import CONF_DIR
from harness.tables import Cell, TableConfigError, cells_from_config, resolve_weights, run_table_job

# Per-image PSNR of DnCNN-S sigma 25 (dncnn_s_sigma25.mat) on Set12 01.png / 02.png with the
# harness's recorded noise seeds, computed once and cross-checked by the independent numpy path
# in the test (model forward, uint8 rounding, PSNR by hand).
SET12_PSNR = {"01": 30.0439, "02": 33.1574}


def base_config(tmp_path, data_root, weights_root):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=paper_dncnn", f"data.root={data_root}", f"weights.root={weights_root}",
            f"store_dir={tmp_path / 'store'}", f"runs_dir={tmp_path / 'runs'}", f"report_dir={tmp_path / 'report'}",
            "progress=false"])
    return OmegaConf.to_container(cfg, resolve=True)


def tiny_table():
    return {"title": "tiny", "tolerance": {"psnr": 0.05, "ssim": 0.002}, "metrics": ["psnr", "ssim"],
            "sections": [{"name": "set12", "title": "Set12 sigma 25", "source": "DnCNN paper, Table III",
                          "dataset": "Set12", "task": "denoise_gray25", "model": "dncnn_gray17", "cells": [
                              {"row": "σ=25", "column": "DnCNN-S", "weights": "dncnn_s_sigma25", "psnr": 30.44,
                               "per_image": True},
                              {"row": "σ=25", "column": "BSD68", "dataset": "BSD68", "weights": "dncnn_s_sigma25",
                               "psnr": 29.23},
                              {"row": "σ=25", "column": "other weights", "weights": "no_such_weights.mat",
                               "psnr": 30.0}]}]}


def independent_psnr(image_path, weights_path, seed):
    """PSNR of DnCNN-S on one image, outside the harness's data/evaluate/metrics code."""
    clean = np.asarray(Image.open(image_path), dtype=np.float32) / 255.0
    noisy = (clean + np.random.Generator(np.random.PCG64(seed)).standard_normal(clean.shape) * (25 / 255)
             ).astype(np.float32)
    model = hm.create("dncnn_gray17")
    load_weights(model, weights_path, strict=True)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(noisy)[None, None])[0, 0].numpy()
    mse = np.mean((np.round(np.clip(out, 0, 1) * 255).astype(np.float64) - np.round(clean * 255)) ** 2)
    return 10 * math.log10(255**2 / mse)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_runs_present_cell_and_lists_absent_cells(tmp_path, eabench_data, eabench_weights):
    data_root = tmp_path / "data"
    (data_root / "Set12").mkdir(parents=True)
    for name in ("01.png", "02.png"):
        shutil.copy(eabench_data / "Set12" / name, data_root / "Set12" / name)
    cfg = base_config(tmp_path, data_root, eabench_weights)
    cfg["table"] = tiny_table()
    summary = run_table_job(cfg, experiment="tiny")
    assert (summary["cells"], summary["cells_run"], summary["cells_not_run"]) == (3, 1, 2)

    report = tmp_path / "report"
    rows = read_csv(report / "results.csv")
    assert [r["column"] for r in rows] == ["DnCNN-S", "BSD68", "other weights"]
    ok, no_data, no_weights = rows
    assert ok["status"] == "ok" and ok["images"] == "2" and ok["model"] == "dncnn_gray17"
    mean = float(ok["psnr"])
    assert mean == pytest.approx(np.mean(list(SET12_PSNR.values())), abs=1e-3)
    assert float(ok["delta_psnr"]) == pytest.approx(mean - 30.44, abs=1e-3)
    assert ok["flag"] == "psnr"  # two easy images: far above the 12-image average
    assert no_data["status"] == "not run" and "dataset BSD68" in no_data["missing"]
    assert no_weights["status"] == "not run" and "no_such_weights.mat" in no_weights["missing"]

    images = read_csv(report / "per_image" / f"{summary_cell_id(cfg)}.csv")
    assert [r["image"] for r in images] == ["01", "02"]
    for r in images:
        seed = derive_seed(0, r["image"])
        assert int(r["seed"]) == seed
        ours = independent_psnr(data_root / "Set12" / f"{r['image']}.png",
                                resolve_weights(cells_from_config(cfg["table"])[0], eabench_weights)[0], seed)
        assert float(r["psnr"]) == pytest.approx(ours, abs=1e-3)
        assert float(r["psnr"]) == pytest.approx(SET12_PSNR[r["image"]], abs=5e-3)

    md = (report / "table.md").read_text()
    assert f"{mean:.2f} / 30.44 ({mean - 30.44:+.2f}) ⚠" in md
    assert "## Cells not run" in md and "no_such_weights.mat" in md
    assert "## Per image: Set12, denoise_gray25, DnCNN-S" in md

    # Render-only: the stored record gives the same row; a configuration never run has no record.
    cfg["table"]["evaluate"] = False
    cfg["table"]["sections"][0]["cells"][1]["dataset"] = "Set12"  # present data, never evaluated
    cfg["table"]["sections"][0]["cells"][1]["task"] = "denoise_gray50"
    cfg["report_dir"] = str(tmp_path / "rendered")
    run_table_job(cfg, experiment="tiny")
    rendered = read_csv(tmp_path / "rendered" / "results.csv")
    assert rendered[0]["psnr"] == ok["psnr"] and rendered[0]["status"] == "ok"
    assert rendered[1]["status"] == "not run" and "stored record" in rendered[1]["missing"]


def summary_cell_id(cfg):
    return cells_from_config(cfg["table"])[0].id


def test_table_config_errors_name_the_problem():
    with pytest.raises(TableConfigError, match="non-empty 'sections'"):
        cells_from_config({})
    bad = {"sections": [{"name": "s", "cells": [{"model": "dncnn_gray17", "task": "denoise_gray25",
                                                  "dataset": "Set12", "pnsr": 30.0}]}]}
    with pytest.raises(TableConfigError, match=r"unknown key\(s\) \['pnsr'\]"):
        cells_from_config(bad)
    twice = {"sections": [{"name": "s", "dataset": "Set12", "task": "denoise_gray25", "cells": [
        {"row": "a", "column": "b", "model": "dncnn_gray17"}, {"row": "a", "column": "b", "model": "dncnn_gray20"}]}]}
    with pytest.raises(TableConfigError, match="share the id"):
        cells_from_config(twice)
    with pytest.raises(TableConfigError, match="no 'task'"):
        cells_from_config({"sections": [{"name": "s", "cells": [{"model": "m", "dataset": "d"}]}]})


def test_weights_found_by_registry_name_in_a_subfolder(tmp_path):
    (tmp_path / "matconvnet").mkdir()
    (tmp_path / "matconvnet" / "dncnn3.mat").write_bytes(b"x")
    cell = Cell(id="c", section="s", row="r", column="c", model="dncnn_gray20", task="jpeg_q10",
                dataset="Classic5", weights="dncnn3")
    assert resolve_weights(cell, tmp_path) == (tmp_path / "matconvnet" / "dncnn3.mat", None)
    path, missing = resolve_weights(cell, None)
    assert path is None and "set weights.root=DIR" in missing and "harness.weights fetch dncnn3" in missing
    no_weights = Cell(id="b", section="s", row="r", column="c", model="bm3d_gray", task="denoise_gray25",
                      dataset="BSD68", weights=None)
    assert resolve_weights(no_weights, None) == (None, None)


def test_paper_dncnn_config_lists_every_published_cell():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / "paper_dncnn.yaml"))
    cells = cells_from_config(cfg["table"])
    # BSD68: 3 sigmas x (BM3D, DnCNN-S, DnCNN-B, FDnCNN); Set12; DnCNN-3: 3 denoising + 3 BM3D,
    # 4 SR sets x 3 scales, 2 JPEG sets x 4 qualities.
    assert len(cells) == 12 + 1 + 6 + 12 + 8
    assert all(c.published_psnr is not None for c in cells)
    assert {c.task for c in cells} >= {"denoise_gray15", "denoise_gray25", "denoise_gray50", "sr_x2", "sr_x3",
                                       "sr_x4", "jpeg_q10", "jpeg_q20", "jpeg_q30", "jpeg_q40"}
    for c in cells:
        assert (CONF_DIR / "model" / f"{c.model}.yaml").is_file() and (CONF_DIR / "task" / f"{c.task}.yaml").is_file()
