"""The runner: every config composes, a job trains/evaluates/profiles/records, re-runs skip, resume works."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import harness.models as hm
from harness.models.registry import CONF_DIR
from harness.runner import run_job
from harness.store import Store
from harness.validate import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["task", "data", "train", "eval", "profile", "erf", "logger", "hardware", "experiment"]
FAST = ["train=smoke", "eval.metrics=[psnr,ssim]", "data.test.crop=64", "data.test.split=test",
        "profile.flops_input=[1,3,32,32]"]


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "embedded":
        overrides += {"benchmark": ["data.root=/x", "data.name=CBSD68"], "paired": ["data.lq_dir=/a", "data.gt_dir=/b"],
                      "sidd": ["data.root=/x"]}[option]
    if group == "task":  # a model that fits the task's channels and scale
        overrides.append({"denoise_gray25": "model=dncnn_gray17", "sr_x2": "model=eamamba_sr_x2",
                          "sr_x3": "model=eamamba_sr_x3", "sr_x4": "model=eamamba_sr_x4"}.get(
            option, "model=dncnn_gray17" if option.startswith(("denoise_gray", "jpeg_q")) else "model=eamamba_tiny"))
        overrides.append("train.patch_size=48")
    if group == "hardware" and option == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA here")
    cfg = OmegaConf.to_container(compose_cfg(overrides), resolve=True)
    assert cfg["experiment_name"]
    if cfg.get("job", "run") == "run":
        model = hm.build(cfg["model"])
        meta = dict(cfg["model"].get("meta") or {})
        validate_config(cfg, meta)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_every_model_preset_composes_as_group():
    for name in hm.available():
        cfg = compose_cfg([f"model={name}", "experiment=single"])
        assert cfg.model._target_


@pytest.mark.parametrize("bad, message", [
    (["train.lr=-1"], "train.lr=-1: must be > 0"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["eval.protocol=matlab"], "eval.protocol='matlab'"),
    (["task=sr_x4"], "task.scale=4: the model"),
    (["task=denoise_gray25"], "task.grey=True: the model takes 3 input channels"),
    (["train.patch_size=36"], "train.patch_size=36: must be a multiple of 8"),
    (["+train.momentum=0.9"], "unknown train settings \\['momentum'\\]"),
])
def test_config_errors_name_key_and_value(bad, message):
    cfg = OmegaConf.to_container(compose_cfg(["experiment=single", "model=eamamba_tiny", "train=quick"] + bad),
                                 resolve=True)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, cfg["model"]["meta"])


def _job_cfg(tmp_path, extra=()):
    cfg = OmegaConf.to_container(compose_cfg(["experiment=single", "model=eamamba_tiny", *FAST, *extra]),
                                 resolve=True)
    cfg["store_dir"], cfg["runs_dir"], cfg["progress"] = str(tmp_path / "store"), str(tmp_path / "runs"), False
    return cfg


def test_job_records_skips_and_resumes(tmp_path):
    cfg = _job_cfg(tmp_path)
    rec = run_job(cfg, experiment="t", model_name="eamamba_tiny")
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["profile"]["params"] == sum(p.numel() for p in hm.create("eamamba_tiny").parameters())
    assert rec["profile"]["gmacs"] > 0 and rec["train"]["iters_done"] == 4
    psnr = rec["metrics"]["psnr"]
    assert len(psnr["values"]) == 3 and psnr["protocol"]["protocol"] == "basicsr"
    # The noisy input (sigma 25 of 255, not clipped) scores about 20·log10(255/25) = 20.17 dB; clamping
    # to [0, 1] for the metric can only raise it.
    assert 20.1 < rec["input_metrics"]["psnr"] < 21.0 and 0 < rec["input_metrics"]["ssim"] < 1
    assert rec["environment"]["torch"] == torch.__version__
    # Latency and peak memory are measured for every run, through harness.profile, at the profile input,
    # with the precision flags that were in force; the thread choice is recorded.
    prof = rec["profile"]
    assert prof["latency_ms"] > 0 and prof["latency_input"] == [1, 3, 32, 32] and prof["latency_repeats"] >= 3
    assert prof["latency_precision"] == "fp32" and prof["precision_flags"]["float32_matmul_precision"] == "highest"
    assert prof["peak_mem_mb"] > 0 and prof["peak_mem_method"].endswith("vmhwm")
    threads = rec["environment"]["cpu_threads"]
    assert 1 <= threads["threads"] <= threads["available_cores"] and threads["threads"] == rec["environment"]["threads"]
    stored = json.loads(Path(tmp_path / "store" / "records" / f"{rec['config_hash']}.json").read_text())
    assert stored["status"] == "ok" and stored["metrics"]["psnr"]["values"] == psnr["values"]
    # Same config again: skipped, nothing re-run.
    again = run_job(cfg, experiment="t", model_name="eamamba_tiny")
    assert again.get("skipped") and again["config_hash"] == rec["config_hash"]
    # Longer budget resumes from the 4-iteration checkpoint of an identical run directory.
    ckpt = Path(rec["run_dir"]) / "last.pt"
    assert torch.load(ckpt, weights_only=True)["iteration"] == 4
    df = Store(cfg["store_dir"]).frame("t")
    assert list(df["status"]) == ["ok"] and df["psnr"].iloc[0] == pytest.approx(psnr["mean"])
    assert df["latency_ms"].iloc[0] == prof["latency_ms"] and df["peak_mem_mb"].iloc[0] == prof["peak_mem_mb"]
    assert df["gflops"].iloc[0] == prof["gmacs"]


def test_records_of_every_version_load_and_flatten():
    from harness.record import RunRecord, flatten_record

    # A record as the quickstart stored it before the record schema (values from reports/quickstart).
    old = {"config_hash": "80cc4777ba1f6c35", "experiment": "quickstart", "run_name": "model=eamamba_tiny",
           "model": "eamamba_tiny", "family": "eamamba", "task": "denoise_gauss25", "seed": 0, "status": "ok",
           "swept": {"model": "eamamba_tiny"}, "profile": {"params": 1961448, "gmacs": 10.404900708,
                                                          "flops_input": [1, 3, 256, 256]},
           "metrics": {"psnr": {"mean": 29.01849256223691}}, "environment": {"device": "cpu", "threads": "2"},
           "ladder_row": {"model": "x"}}
    rec = RunRecord.from_dict(old)
    assert rec.profile["gmacs"] == 10.404900708 and rec.extra == {"ladder_row": {"model": "x"}}
    assert rec.to_dict() == old
    row = flatten_record(old)
    assert row["gflops"] == 10.404900708 and row["params"] == 1961448 and row["flops_input"] == "1x3x256x256"
    assert row["latency_ms"] is None and row["peak_mem_mb"] is None and row["psnr"] == 29.01849256223691
    assert "model" not in [k for k in row if k.startswith("swept")] and list(row).count("model") == 1
    with pytest.raises(ValueError, match="config_hash"):
        RunRecord.from_dict({"experiment": "x"})


def test_job_kinds_are_a_registry():
    from harness.jobs import JOB_KINDS, JobIdentity, register_job, resolve_job, run_job_kind

    assert {"run", "efficiency", "ladder"} <= set(JOB_KINDS)
    with pytest.raises(ValueError, match="unknown job kind job='nope'; valid: run, efficiency, ladder"):
        resolve_job("nope")
    register_job("echo_t", f"{__name__}:_echo_job")
    try:
        identity = JobIdentity("exp", "dncnn_tiny", {"model": "dncnn_tiny", "seed": "1"})
        out = run_job_kind("echo_t", {"a": 1}, identity)
        # Only the identity fields the function declares are passed.
        assert out == {"cfg": {"a": 1}, "experiment": "exp", "swept": {"model": "dncnn_tiny", "seed": "1"},
                       "run_name": "model=dncnn_tiny,seed=1"}
        with pytest.raises(ValueError, match="already registered"):
            register_job("echo_t", "elsewhere:fn")
    finally:
        del JOB_KINDS["echo_t"]


def _echo_job(cfg, *, experiment, swept=None, run_name=None):
    return {"cfg": cfg, "experiment": experiment, "swept": swept, "run_name": run_name}


def test_thread_choice():
    from harness.hardware import available_cores, choose_threads

    assert choose_threads(1)["threads"] == 1 and choose_threads(1)["rule"] == "set in the config"
    auto = choose_threads(None, sample_s=0.05)
    assert 1 <= auto["threads"] <= available_cores() == auto["available_cores"]
    assert auto["busy_cores"] is None or 0 <= auto["busy_cores"] <= available_cores() + 1e-6
    with pytest.raises(ValueError, match="hardware.threads must be a positive integer"):
        choose_threads("many")


def test_exact_resume_matches_uninterrupted(tmp_path):
    from harness.data import EmbeddedDataset, PatchDataset
    from harness.train import TrainSettings, train

    def run(run_dir, stop_at=None):
        torch.manual_seed(0)
        model = hm.create("eamamba_tiny")
        ds = PatchDataset(EmbeddedDataset("val"), 32, online_degradation={"name": "gaussian_noise", "sigma": 25})
        s = TrainSettings(iters=6, batch_size=2, patch_size=32, lr=1e-3, ckpt_every=3, ema=0.9)

        def interrupt(entry):
            if entry["iter"] == stop_at:
                raise KeyboardInterrupt

        out = train(model, ds, s, device=torch.device("cpu"), run_dir=run_dir, progress=False, log=interrupt)
        return model, out

    full, _ = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=4)  # interrupted after iteration 4; last checkpoint at 3
    resumed, out = run(tmp_path / "b")
    assert out["resumed_from"] == 3
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_failed_job_is_recorded_not_raised(tmp_path):
    cfg = _job_cfg(tmp_path, ["data.test.split=nope"])
    rec = run_job(cfg, experiment="t", model_name="eamamba_tiny")
    assert rec["status"] == "failed" and "unknown embedded split 'nope'" in rec["error"]
    assert "Traceback" in rec["traceback"]
    assert Store(cfg["store_dir"]).get(rec["config_hash"])["status"] == "failed"


@pytest.mark.slow
def test_cli_single_run_writes_report(tmp_path):
    env = {"EABENCH_STORE": str(tmp_path / "store"), "EABENCH_RUNS": str(tmp_path / "runs"), "WANDB_MODE": "offline",
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    cmd = [sys.executable, "run.py", "experiment=single", "model=dncnn_tiny", *FAST, f"report_dir={tmp_path}/rep",
           f"hydra.run.dir={tmp_path}/out", "progress=false"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "dncnn_tiny" in table and "| ok |" in table
    assert (tmp_path / "rep" / "results.csv").is_file() and (tmp_path / "rep" / "report.md").is_file()


def test_erf_experiment_step(tmp_path):
    cfg = _job_cfg(tmp_path, ["erf=default", "erf.images=2", "erf.size=32", "train=none", "eval=none"])
    cfg["model"] = dict(compose_cfg(["model=dncnn_tiny", "experiment=single"]).model)
    rec = run_job(OmegaConf.to_container(OmegaConf.create(cfg)), experiment="erf_t", model_name="dncnn_tiny")
    assert rec["status"] == "ok", rec.get("traceback")
    ratios = rec["erf"]["area_ratios"]
    assert set(ratios) == {"0.2", "0.3", "0.5", "0.99"}
    assert all(0 < ratios[k] <= ratios[j] <= 1 for k, j in [("0.2", "0.3"), ("0.3", "0.5"), ("0.5", "0.99")])
    assert Path(rec["erf"]["files"]["npy"]).is_file()


def test_scaling_and_efficiency_jobs(tmp_path):
    from harness.profile_job import run_efficiency_job, run_ladder_job

    cfg = _job_cfg(tmp_path)
    cfg["report_dir"] = str(tmp_path / "rep")
    cfg["scaling"] = {"presets": ["dncnn_tiny", "eamamba_tiny"], "sizes": [16, 20, 32], "measure": ["flops"]}
    run_ladder_job(cfg, experiment="scaling_t")
    recs = {r["run_name"]: r for r in Store(cfg["store_dir"]).records("scaling_t")}
    assert recs["dncnn_tiny@32"]["status"] == "ok" and recs["eamamba_tiny@16"]["status"] == "ok"
    assert recs["eamamba_tiny@20"]["status"] == "failed"  # 20 is not a multiple of 8: a row, not a crash
    assert recs["dncnn_tiny@32"]["profile"]["gmacs"] == pytest.approx(4 * recs["dncnn_tiny@16"]["profile"]["gmacs"])
    cfg["efficiency"] = {"presets": ["dncnn_color20", "eamamba_sr_x2"], "verified_linear": True,
                         "probe_sizes": [32, 64]}
    run_efficiency_job(cfg, experiment="eff_t")
    eff = {r["model"]: r for r in Store(cfg["store_dir"]).records("eff_t")}
    assert eff["dncnn_color20"]["profile"]["params"] == 668_227
    assert eff["dncnn_color20"]["profile"]["gmacs"] == pytest.approx(43.713, rel=2e-3)
    assert eff["eamamba_sr_x2"]["profile"]["gmacs"] == pytest.approx(52.98, rel=2e-3)


@pytest.mark.slow
def test_ddp_two_processes_gloo_on_cpu(tmp_path):
    env = {**__import__("os").environ, "EABENCH_STORE": str(tmp_path / "store"), "EABENCH_RUNS": str(tmp_path / "runs"),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "run.py",
           "experiment=single", "model=dncnn_tiny", *FAST, "train.batch_size=4", f"report_dir={tmp_path}/rep",
           f"hydra.run.dir={tmp_path}/out"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = Store(tmp_path / "store").records("single")
    assert len(recs) == 1 and recs[0]["status"] == "ok", recs[0].get("traceback") if recs else res.stderr[-2000:]
    assert recs[0]["train"]["world_size"] == 2 and recs[0]["train"]["replicas_identical"] is True


def test_loggers_csv_and_wandb_offline(tmp_path, monkeypatch):
    from harness.cli import log_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    record = {"run_dir": str(tmp_path / "run"), "run_name": "r", "experiment": "e", "config": {"seed": 0},
              "train": {"history": [{"iter": 1, "loss": 0.5, "lr": 1e-3}, {"iter": 2, "loss": 0.25, "lr": 1e-3}]},
              "metrics": {"psnr": {"mean": 30.0}}, "profile": {"params": 10, "gmacs": 1.0}}
    log_history(record, {"kind": "csv"})
    lines = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert lines[0] == "iter,loss,lr" and lines[2].startswith("2,0.25")
    pytest.importorskip("wandb")
    log_history(record, {"kind": "wandb", "project": "eabench-test", "mode": "offline", "dir": str(tmp_path)})
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
