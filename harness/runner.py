"""One job of a sweep: config -> model + data -> train / evaluate / profile -> one stored record.

``run_job`` never lets an exception escape for a failure of the run itself (bad data, NaN
loss, out of memory, ...): it writes a record with status "failed", the error and the
traceback, so the other jobs of a sweep go on and the report shows the failure. Only
configuration errors found before any work (``ConfigError``) are raised, since every job of
such a sweep would fail the same way. KeyboardInterrupt is re-raised after nothing is written:
the run's checkpoint stays, and the next invocation resumes it.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import torch

from harness.data import PatchDataset, build_dataset
from harness.evaluate import evaluate, summarise
from harness.hardware import configure_threads
from harness.models import build
from harness.profile import count_flops, count_params, environment, measure_latency, peak_memory
from harness.record import RunRecord
from harness.store import Store, config_hash
from harness.train import TrainSettings, train
from harness.validate import ConfigError, validate_config

# Parts of the config that change a run's result; store paths, logging, reporting do not.
SEMANTIC_KEYS = ("model", "task", "data", "train", "eval", "profile", "erf", "seed", "checkpoint", "hardware")
_DEGRADABLE_KINDS = ("embedded", "folder", "benchmark", "list")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dataset(spec: Mapping[str, Any], task: Mapping[str, Any], seed: int, degradation_key: str = "degradation"):
    spec = dict(spec)
    if spec.get("kind", "embedded") in _DEGRADABLE_KINDS:
        spec.setdefault("degradation", task.get(degradation_key))
        spec.setdefault("seed", seed)
        if spec.get("kind", "embedded") == "embedded":
            spec.setdefault("grey", bool(task.get("grey", False)))
    return build_dataset(spec)


def _profile_input(shape: Any, meta: Mapping[str, Any], channels: int) -> list[int]:
    shape = list(shape or meta.get("flops_input") or [1, channels, 256, 256])
    shape[1] = channels
    return [int(s) for s in shape]


def evaluation_settings(cfg: Mapping[str, Any], meta: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``evaluate``'s keyword arguments for a composed config and a preset's meta block."""
    task, ev = cfg["task"], cfg["eval"]
    return dict(metrics=tuple(ev.get("metrics", ("psnr", "ssim"))), protocol=ev.get("protocol", "basicsr"),
                crop_border=int(ev.get("crop_border", task.get("crop_border", 0)) or 0),
                y_channel=bool(ev.get("y_channel", task.get("y_channel", False))),
                lpips_net=ev.get("lpips_net", "alex"), pad_multiple=int(meta.get("pad_multiple", 1)),
                scale=int(task.get("scale", 1)), tile=ev.get("tile"), tile_overlap=int(ev.get("tile_overlap", 32)),
                ensemble=ev.get("ensemble"), channels_last=bool(meta.get("channels_last", False)), device=device)


def profile_model(model: torch.nn.Module, cfg: Mapping[str, Any], meta: Mapping[str, Any],
                  device: torch.device) -> dict[str, Any]:
    """Parameters always; FLOPs (paper convention), latency and peak memory as ``cfg.profile`` asks.

    All three use the profile input (``profile.flops_input``, else the preset's ``meta.flops_input``;
    ``profile.latency_input`` may set another for latency and memory). Latency and memory go
    through ``harness.profile`` (``measure_latency``, ``peak_memory``) under
    ``profile.precision`` ("fp32" = strict, TF32 off), and the flags in force are recorded.
    """
    prof = cfg["profile"]
    out: dict[str, Any] = {"params": count_params(model)}
    channels = int(meta.get("in_channels", 3))
    shape = _profile_input(prof.get("flops_input"), meta, channels)
    if prof.get("flops"):
        result = count_flops(model, shape)
        out.update({"gmacs": result.gmacs, "flops_input": shape, "flops_by_operator": result.by_operator,
                    "flops_unsupported": {k: int(v) for k, v in result.unsupported.items()},
                    "flops_convention": result.convention, "gmacs_conv_only": result.conv_only / 1e9})
    timed_shape = _profile_input(prof.get("latency_input"), meta, channels) if prof.get("latency_input") else shape
    precision = str(prof.get("precision", "fp32"))
    if prof.get("latency"):
        t = measure_latency(model, timed_shape, device=device, precision=precision,
                            warmup=int(prof.get("warmup", 2)), repeats=int(prof.get("repeats", 5)),
                            min_warmup_s=float(prof.get("min_warmup_s", 0.0)),
                            max_time_s=prof.get("max_time_s"))
        out.update({"latency_ms": t["median_ms"], "latency_p90_ms": t["p90_ms"], "latency_min_ms": t["min_ms"],
                    "latency_input": timed_shape, "latency_repeats": t["repeats"], "latency_precision": precision,
                    "precision_flags": {k: t[k] for k in ("autocast", "tf32_matmul", "tf32_cudnn",
                                                          "float32_matmul_precision", "cudnn_benchmark")},
                    "latency_timer": t["timer"]})
    if prof.get("memory"):
        mem = peak_memory(model, timed_shape, device=device, precision=precision,
                          threads=torch.get_num_threads())
        if mem.get("status") == "oom":
            raise torch.OutOfMemoryError(f"out of memory measuring peak memory at {timed_shape}: {mem.get('error')}")
        out.update({"peak_mem_mb": mem["peak_mb"], "peak_mem_method": mem["method"], "peak_mem_input": timed_shape})
    model.train()
    return out


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1); returns (rank, world)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def run_job(cfg: Mapping[str, Any], *, experiment: str = "default", model_name: str | None = None,
            swept: Mapping[str, Any] | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Run (or skip, if already complete) one configuration and return its stored record."""
    cfg = dict(cfg)
    model_cfg = dict(cfg["model"])
    meta = dict(model_cfg.get("meta") or {})
    if model_name:
        meta.setdefault("preset", model_name)
    validate_config(cfg, meta)
    semantic = {k: cfg.get(k) for k in SEMANTIC_KEYS}
    # The experiment is part of the identity: the same configuration run by two experiments
    # gives two records, so each experiment's report is complete on its own.
    run_hash = config_hash({"experiment": experiment, **semantic})
    store = Store(cfg["store_dir"])
    existing = store.finished(run_hash, force=bool(cfg.get("force", False)))
    if existing is not None:
        return existing

    settings = TrainSettings.from_config(cfg["train"])
    device = resolve_device(str(cfg["hardware"].get("device", "cpu")))
    rank, world = init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    threads = configure_threads(cfg["hardware"].get("threads"))
    run_dir = Path(cfg.get("runs_dir", "runs")) / run_hash
    run = RunRecord(
        config_hash=run_hash, experiment=experiment, run_name=run_name or run_hash,
        model=model_name or meta.get("preset") or model_cfg.get("_target_", "?").rsplit(".", 1)[-1],
        family=meta.get("family"), task=cfg["task"].get("name"), seed=cfg["seed"], swept=dict(swept or {}),
        config=semantic, started_at=time.time(), run_dir=str(run_dir),
        environment={**environment(device), "world_size": world, "cpu_threads": threads})
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        torch.manual_seed(cfg["seed"])
        model = build(model_cfg).to(device)
        if cfg.get("checkpoint"):
            from harness.checkpoints import load_weights

            run.checkpoint = load_weights(model, cfg["checkpoint"], strict=True)
        t = time.perf_counter()
        run.profile = profile_model(model, cfg, meta, device)
        timings["profile_s"] = time.perf_counter() - t

        task, data, ev = cfg["task"], cfg["data"], cfg["eval"]
        scale = int(task.get("scale", 1))
        eval_kwargs = evaluation_settings(cfg, meta, device)
        if settings.iters > 0:
            online = task.get("train_degradation") if task.get("online_degradation", True) and scale == 1 else None
            base = _dataset(data["train"], task, cfg["seed"])
            patches = PatchDataset(base, settings.patch_size, augment=bool(data.get("augment", True)),
                                   online_degradation=online, seed=cfg["seed"])
            val_set = _dataset(data["val"], task, cfg["seed"]) if data.get("val") else None

            def validate(m):
                res = evaluate(m, val_set, **{**eval_kwargs, "metrics": ("psnr",)})["results"]
                return {"psnr": res["psnr"].mean} if "psnr" in res else {}

            t = time.perf_counter()
            trained = train(model, patches, settings, device=device, seed=cfg["seed"], run_dir=run_dir,
                            validate=validate if val_set is not None and settings.val_every else None,
                            progress=bool(cfg.get("progress", True)))
            timings["train_s"] = time.perf_counter() - t
            run.train = {k: trained[k] for k in ("history", "iters_done", "resumed_from", "time_s", "world_size")
                         if k in trained}
            if "replicas_identical" in trained:
                run.train["replicas_identical"] = trained["replicas_identical"]
            if trained["ema"] is not None:
                model = trained["ema"]
        if ev.get("enabled", True):
            test_set = _dataset(data["test"], task, cfg["seed"])
            t = time.perf_counter()
            out = evaluate(model, test_set, **eval_kwargs, limit=ev.get("limit"),
                           save_dir=run_dir / "images" if ev.get("save_images") else None)
            timings["eval_s"] = time.perf_counter() - t
            run.metrics = summarise(out["results"])
            run.input_metrics = {m: r.mean for m, r in out["input_results"].items()}
            run.dataset = getattr(test_set, "dataset_name", data["test"].get("kind"))
            # one sha256 over the test set's files (None for embedded photos): same digest, same data
            run.data_digest = test_set.digest() if hasattr(test_set, "digest") else None
            run.nonfinite = out["nonfinite"]
            if out["nonfinite"]:
                raise FloatingPointError(f"non-finite model output on {len(out['nonfinite'])} of {out['images']} "
                                         f"images ({out['nonfinite'][:5]}); those images are not in the metrics")
        if cfg.get("erf") and cfg["erf"].get("enabled"):
            from harness.erf_job import erf_for_run

            run.erf = erf_for_run(model, cfg["erf"], meta, device, run_dir)
        run.status = "ok"
    except ConfigError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes a record, the sweep goes on
        run.status = "failed"
        run.error = f"{'out of memory: ' if _is_oom(err) else ''}{type(err).__name__}: {err}"
        run.traceback = traceback.format_exc()
    timings["total_s"] = time.perf_counter() - t_start
    run.timings = timings
    run.finished_at = time.time()
    record = run.to_dict()
    if rank == 0:  # one record per run, written by the first process of a data-parallel group
        store.put(record)
    return record

