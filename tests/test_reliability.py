"""Reliability: failures are recorded and isolated, interruptions resume, parallel writers lose nothing."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.models.registry import CONF_DIR
from harness.report import write_report
from harness.runner import run_job
from harness.store import Store
from harness.testing.faults import faulty_model_config

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train=smoke", "eval.metrics=[psnr,ssim]", "data.test.crop=48", "profile.flops_input=[1,3,32,32]",
        "progress=false"]


def base_cfg(tmp_path, extra=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=["experiment=single", *FAST, *extra]),
                                     resolve=True)
    cfg["store_dir"], cfg["runs_dir"] = str(tmp_path / "store"), str(tmp_path / "runs")
    return cfg


def test_failures_are_isolated_and_reported(tmp_path):
    modes = ["ok", "raise", "nan_loss", "oom", "nan_output", "ok"]
    records = []
    for i, mode in enumerate(modes):
        cfg = base_cfg(tmp_path, [f"seed={i}"])
        cfg["model"] = faulty_model_config(mode)
        records.append(run_job(cfg, experiment="faults", model_name=f"faulty_{mode}", run_name=f"{i}-{mode}"))
    status = [r["status"] for r in records]
    assert status == ["ok", "failed", "failed", "failed", "failed", "ok"]
    assert "injected failure" in records[1]["error"]
    assert "NonFiniteLoss" in records[2]["error"] and "iteration 0" in records[2]["error"]
    assert records[3]["error"].startswith("out of memory")
    assert "non-finite model output on 3 of 3 images" in records[4]["error"]
    assert all("Traceback" in r["traceback"] for r in records if r["status"] == "failed")
    store = Store(tmp_path / "store")
    assert len(store.records("faults")) == 6  # every job has a record, failed ones too
    out = write_report(tmp_path / "store", "faults", tmp_path / "report")
    text = (out / "report.md").read_text()
    assert text.count("**failed**") == 4 and "injected failure" in text
    assert (out / "results.csv").read_text().count("failed") >= 4


def _writer(args):
    root, worker, n = args
    store = Store(root)
    for i in range(n):
        store.put({"config_hash": f"w{worker}-{i:03d}", "experiment": "conc", "model": "m", "status": "ok",
                   "payload": "x" * 2000})
    return worker


def test_parallel_writers_lose_nothing(tmp_path):
    workers, per_worker = 6, 40
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_writer, [(str(tmp_path), w, per_worker) for w in range(workers)])
    store = Store(tmp_path)
    recs = store.records("conc")
    assert len(recs) == workers * per_worker
    assert all(r["payload"] == "x" * 2000 for r in recs)  # no torn records
    assert len(store.query("experiment = ?", ("conc",))) == workers * per_worker
    assert not list((tmp_path / "records").glob("*.tmp"))  # temporary files cleaned


def _sweep_cmd(tmp_path, launcher=()):
    return [sys.executable, "run.py", "-m", "experiment=single", "model=dncnn_tiny", "seed=0,1,2,3",
            "train=quick", "train.iters=300", "train.ckpt_every=5", "train.batch_size=2", "train.patch_size=32",
            "eval.metrics=[psnr]", "data.test.crop=48", "profile.flops=false", "progress=false",
            f"report_dir={tmp_path}/rep", f"hydra.sweep.dir={tmp_path}/ms", *launcher]


def _env(tmp_path):
    return {**os.environ, "EABENCH_STORE": str(tmp_path / "store"), "EABENCH_RUNS": str(tmp_path / "runs"),
            "WANDB_MODE": "offline"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_sweep_resumes_without_duplicates(tmp_path, sig):
    env = _env(tmp_path)
    proc = subprocess.Popen(_sweep_cmd(tmp_path), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    records = tmp_path / "store" / "records"
    deadline = time.time() + 300
    # Wait until one run is complete and another is mid-training (a checkpoint, no record), then interrupt.
    while time.time() < deadline:
        done = {p.stem for p in records.glob("*.json")} if records.exists() else set()
        ckpts = {p.parent.name for p in (tmp_path / "runs").glob("*/last.pt")} if (tmp_path / "runs").exists() else set()
        if done and ckpts - done:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    before = {p.stem for p in records.glob("*.json")}
    assert 1 <= len(before) < 4
    res = subprocess.run(_sweep_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = Store(tmp_path / "store").records("single")
    assert len(recs) == 4 and len({r["config_hash"] for r in recs}) == 4
    assert all(r["status"] == "ok" for r in recs)
    resumed = [r for r in recs if (r.get("train") or {}).get("resumed_from")]
    assert resumed, "the interrupted run should resume from its checkpoint"
    assert {p.stem for p in records.glob("*.json")} >= before
    assert not list(records.glob("*.tmp"))


@pytest.mark.slow
def test_joblib_launcher_parallel_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cmd = _sweep_cmd(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"])
    cmd[cmd.index("train.iters=300")] = "train.iters=4"
    res = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = Store(tmp_path / "store").records("single")
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    # Runs are labelled by what the sweep varied (the seed); the model they share is named once.
    table = (tmp_path / "rep" / "table.md").read_text()
    assert sorted(line.split(" | ")[0] for line in table.splitlines()[2:]) == [f"| seed={i}" for i in range(4)]
    assert "Every run: model dncnn_tiny" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("launcher, plugin", [
    (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], "hydra_plugins.hydra_submitit_launcher"),
    (["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false"],
     "hydra_plugins.hydra_ray_launcher"),
])
def test_cluster_launchers_locally(tmp_path, launcher, plugin):
    pytest.importorskip(plugin)
    cmd = _sweep_cmd(tmp_path, launcher)
    cmd[cmd.index("seed=0,1,2,3")] = "seed=0,1"
    cmd[cmd.index("train.iters=300")] = "train.iters=2"
    res = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = Store(tmp_path / "store").records("single")
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
