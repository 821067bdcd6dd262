"""Reports: tables, figures and statistics rendered from stored records."""

import random

import pytest

from harness.report import write_report
from harness.report.stats import paired_bootstrap
from harness.store import Store


def test_paired_bootstrap_detects_real_and_null_gaps():
    rng = random.Random(0)
    base = [30 + rng.gauss(0, 2) for _ in range(60)]
    better = [b + 0.05 + rng.gauss(0, 0.01) for b in base]  # tiny but consistent gain
    noise = [b + rng.gauss(0, 0.5) for b in base]  # no gain, large per-image scatter
    s = paired_bootstrap(better, base)
    assert s["significant"] and s["ci_low"] > 0 and s["mean_diff"] == pytest.approx(0.05, abs=0.01)
    assert not paired_bootstrap(noise, base)["significant"]
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap([1.0], [1.0, 2.0])


def _record(name, seed, psnr_values, status="ok", gmacs=1.0):
    return {"config_hash": f"{name}-{seed}", "experiment": "rep", "run_name": f"model={name},seed={seed}",
            "model": name, "seed": seed, "swept": {"model": name, "seed": str(seed)}, "status": status,
            "profile": {"params": 1000, "gmacs": gmacs},
            "metrics": {"psnr": {"mean": sum(psnr_values) / len(psnr_values), "values": psnr_values,
                                 "names": [f"im{i}" for i in range(len(psnr_values))],
                                 "protocol": {"protocol": "basicsr", "channels": "RGB", "crop_border": 0}}},
            "environment": {"device": "cpu", "cpu": "test", "torch": "x"}}


def test_report_files_tables_and_seed_statistics(tmp_path):
    store = Store(tmp_path / "store")
    for seed in (0, 1):
        store.put(_record("a", seed, [30.0 + seed, 31.0, 32.0]))
        store.put(_record("b", seed, [30.5 + seed, 31.5, 32.5], gmacs=2.0))
    for seed in (0, 1):  # both stored above again, now with the degraded input's metrics
        store.put(dict(_record("a", seed, [30.0 + seed, 31.0, 32.0]), task="denoise_gauss25",
                       input_metrics={"psnr": 20.1734, "ssim": 0.41234}))
    failed = _record("c", 0, [1.0, 1.0, 1.0], status="failed")
    failed["error"] = "RuntimeError: boom"
    store.put(failed)
    out = write_report(tmp_path / "store", "rep", tmp_path / "rep")
    csv = (out / "results.csv").read_text()
    assert csv.splitlines()[0].startswith("experiment,") and len(csv.splitlines()) == 6
    for col in ("model", "params", "gflops", "psnr", "status"):
        assert col in csv.splitlines()[0].split(",")
    assert "\\begin{tabular}" in (out / "table.tex").read_text()
    seeds = (out / "table_seeds.md").read_text()
    assert "model=a" in seeds and "31.1667 ± 0.2357" in seeds  # mean of 31 and 31.333; std of the pair
    # Runs are labelled by the swept values that differ (the model by its name); columns equal in
    # every row (params, device) leave the table for one "Every run" line.
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| run | GFLOPs (MACs) | PSNR | ΔPSNR vs ref [95% CI] | status |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| b, seed=0", "| b, seed=1", "| a, seed=0",
                                                             "| a, seed=1", "| c, seed=0"]
    report = (out / "report.md").read_text()
    assert "Every run: params (M) 0.001, device cpu." in report
    assert "**failed** `c, seed=0`: RuntimeError: boom" in report
    assert "Degraded input (denoise_gauss25, same images and protocol; bicubic upscaling for SR): " \
           "PSNR 20.17, SSIM 0.4123." in report
    assert (out / "figures" / "psnr_vs_gflops.png").stat().st_size > 1000


def test_erf_grid_and_area_columns(tmp_path):
    import numpy as np

    store = Store(tmp_path / "store")
    for name, width in (("narrow", 2.0), ("wide", 8.0)):
        yy, xx = np.mgrid[-16:16, -16:16]
        erf_map = np.exp(-(xx ** 2 + yy ** 2) / (2 * width ** 2))
        np.save(tmp_path / f"{name}.npy", erf_map)
        rec = _record(name, 0, [30.0, 31.0, 32.0])
        rec["erf"] = {"files": {"npy": str(tmp_path / f"{name}.npy")}, "scaling": "power0.25",
                      "area_ratios": {"0.5": 0.01 if name == "narrow" else 0.1}}
        store.put(rec)
    out = write_report(tmp_path / "store", "rep", tmp_path / "rep")
    assert (out / "figures" / "erf_grid.png").stat().st_size > 1000
    assert "ERF area ratio @0.5" in (out / "table.md").read_text()
    assert "erf_grid.png" in (out / "report.md").read_text()
