"""Glue between Hydra and the harness: collect the job's identity, run its kind (``harness.jobs``), log."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from harness.models.registry import CONF_DIR

log = logging.getLogger("eabench")

_FLAGS_WITHOUT_RUN = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--shell-completion",
                      "-sc"}


# Overrides that say where or how to run, not what: they do not name a run.
_NOT_IDENTITY = {"experiment", "report", "report_dir", "progress", "store_dir", "runs_dir", "force"}


def _experiment_from_argv(argv: list[str]) -> str | None:
    name = "quickstart"  # the default in conf/config.yaml
    for arg in argv[1:]:
        if arg.startswith("experiment="):
            name = arg.split("=", 1)[1]
    return None if name in ("null", "") else name


def ensure_multirun_for_sweeps(argv: list[str]) -> list[str]:
    """Add -m when the chosen experiment defines a sweep, so `python run.py` runs it whole."""
    if any(a in ("-m", "--multirun") for a in argv) or any(a.split("=")[0] in _FLAGS_WITHOUT_RUN for a in argv):
        return argv
    name = _experiment_from_argv(argv)
    path = CONF_DIR / "experiment" / f"{name}.yaml"
    if name is None or not path.is_file():
        return argv
    spec = yaml.safe_load(path.read_text()) or {}
    if (spec.get("hydra") or {}).get("sweeper", {}).get("params"):
        return [argv[0], "-m", *argv[1:]]
    return argv


def _job_identity() -> tuple[str | None, dict[str, str]]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, {}
    hc = HydraConfig.get()
    swept = {}
    for override in hc.overrides.task:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key not in _NOT_IDENTITY and not key.startswith("hydra"):
            swept[key] = value
    return hc.runtime.choices.get("model"), swept


def log_history(record: dict[str, Any], logger_cfg: dict[str, Any]) -> None:
    """Write the training history where the logger config says (CSV in the run dir, or wandb)."""
    history = (record.get("train") or {}).get("history") or []
    kind = logger_cfg.get("kind", "none")
    if kind == "csv" and history:
        path = Path(record["run_dir"]) / "history.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for row in history for k in row})
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
    elif kind == "wandb":
        import wandb

        run = wandb.init(project=logger_cfg.get("project", "eabench"), mode=logger_cfg.get("mode", "offline"),
                         name=record.get("run_name"), group=record.get("experiment"), config=record.get("config"),
                         dir=logger_cfg.get("dir") or None, reinit=True)
        for row in history:
            run.log({k: v for k, v in row.items() if k != "iter"}, step=int(row["iter"]))
        run.summary.update({m: v.get("mean") for m, v in (record.get("metrics") or {}).items()})
        run.summary.update({k: record.get("profile", {}).get(k) for k in ("params", "gmacs")})
        run.finish()


def run_from_hydra(cfg: DictConfig) -> dict[str, Any]:
    """Run one composed job with the function its ``job`` kind names (``harness.jobs``); returns the record."""
    from harness.jobs import JobIdentity, run_job_kind

    plain = OmegaConf.to_container(cfg, resolve=True)
    model_name, swept = _job_identity()
    identity = JobIdentity(experiment=plain.get("experiment_name", "default"), model_name=model_name, swept=swept)
    record = run_job_kind(plain.get("job", "run"), plain, identity)
    if record.get("status") == "ok" and not record.get("skipped"):
        log_history(record, plain.get("logger") or {})
    state = "skipped (complete record exists)" if record.get("skipped") else record.get("status")
    summary = {k: (v.get("mean") if isinstance(v, dict) else v) for k, v in (record.get("metrics") or {}).items()}
    log.info("%s [%s] %s %s", record.get("run_name"), state, json.dumps(summary, default=str),
             record.get("error") or "")
    return record
