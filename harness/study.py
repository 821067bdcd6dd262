"""The study job (``job: study``): one variant of an ablation study trained, tested on several
sets, its trained weights and ERF kept, and one record stored.

An experiment such as ``conf/experiment/ablation_gray25.yaml`` names its variants under
``study.variants`` and picks one with ``variant``; Hydra sweeps ``variant`` and ``seed``. The
variant is resolved to a full model config *before* the config hash is taken, so the hash
names what was trained, not a label. Data come from ``sets`` (a root holding the training
folder and benchmark sets), not from the ``data`` group: the training folder, the validation
set (logged every ``train.val_every`` steps, never used to choose anything) and every test set
are recorded in the run's ``config.data``.

A record has the runner's keys (``profile``, ``train``, ``metrics`` of the first test set,
``timings``, ``environment``) plus ``variant``, ``tests`` (per test set: per-image PSNR/SSIM
and the noisy input's scores), ``train.ms_per_step`` (training time without validation),
``weights`` and ``erf`` (paths relative to the store directory, so records stay portable).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from harness.data import PatchDataset, build_dataset
from harness.evaluate import evaluate, summarise
from harness.hardware import configure_threads
from harness.models import build
from harness.models.registry import model_in_channels, preset_config
from harness.runner import SEMANTIC_KEYS, environment, evaluation_settings, profile_model, resolve_device
from harness.store import Store, atomic_write_text, config_hash
from harness.train import TrainSettings, train
from harness.validate import ConfigError


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def resolve_variant(study: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The model config (``_target_``, arguments, ``meta``) of ``variant`` in ``study``.

    An entry without ``preset`` is ``study.base`` with the entry's args on top; an entry with
    ``preset`` is that preset with its args. Unknown names and arguments are errors that list
    the valid ones.
    """
    variants = study.get("variants") or {}
    if variant not in variants:
        raise ConfigError(f"unknown variant {variant!r}; this study's variants: {sorted(variants)}")
    entry = dict(variants[variant] or {})
    unknown = set(entry) - {"preset", "args"}
    if unknown:
        raise ConfigError(f"variant {variant!r}: unknown keys {sorted(unknown)} (valid: preset, args)")
    base = dict(study.get("base") or {})
    if entry.get("preset"):
        preset, args = entry["preset"], dict(entry.get("args") or {})
    else:
        if not base.get("preset"):
            raise ConfigError(f"variant {variant!r} has no preset and the study has no base preset")
        preset, args = base["preset"], {**dict(base.get("args") or {}), **dict(entry.get("args") or {})}
    try:
        spec = _plain(preset_config(preset))
    except ValueError as err:
        raise ConfigError(f"variant {variant!r}: {err}") from err
    meta = dict(spec.pop("meta", None) or {})
    for key in args:
        if key not in spec:
            raise ConfigError(f"variant {variant!r}: preset {preset!r} has no argument {key!r}; "
                              f"its arguments: {sorted(k for k in spec if k != '_target_')}")
    spec.update(_plain(args))
    meta.pop("in_channels", None)  # the preset's; the variant's args may change it
    spec["meta"] = meta
    meta["in_channels"] = model_in_channels(build(spec))  # its first convolution's
    meta.update(preset=preset, variant=variant)
    return spec


def _sets_data(sets: Mapping[str, Any], task: Mapping[str, Any]) -> dict[str, Any]:
    """Dataset specs (``build_dataset`` dicts) of the training folder, validation and test sets."""
    if not sets.get("root"):
        raise ConfigError("sets.root is not set: give the folder holding the training and test sets "
                          "(e.g. sets.root=/data with /data/Train400, /data/BSD68, /data/Set12)")
    root = str(sets["root"])
    grey = bool(task.get("grey", False))
    noise = _plain(task.get("degradation"))
    seed = int(sets.get("test_seed", 0))

    def bench(name: str) -> dict[str, Any]:
        return {"kind": "benchmark", "root": root, "name": name, "grey": grey, "degradation": noise, "seed": seed}

    tests = list(sets.get("test") or [])
    if not tests:
        raise ConfigError("sets.test lists no test set")
    return {"train": {"kind": "folder", "folder": str(Path(root) / sets["train"]), "grey": grey,
                      "degradation": noise, "seed": seed},
            "val": bench(sets["val"]) if sets.get("val") else None,
            "val_limit": sets.get("val_limit"),
            "tests": {name: bench(name) for name in tests},
            "test_limit": sets.get("test_limit"),
            "augment": True}


def study_identity(cfg: Mapping[str, Any], experiment: str) -> tuple[str, dict[str, Any]]:
    """(config hash, semantic config) of one study job, with the variant resolved."""
    cfg = dict(cfg)
    variant = str(cfg.get("variant"))
    model = resolve_variant(cfg.get("study") or {}, variant)
    semantic = {k: cfg.get(k) for k in SEMANTIC_KEYS}
    semantic["model"] = model
    semantic["data"] = _sets_data(cfg.get("sets") or {}, cfg["task"])
    return config_hash({"experiment": experiment, **semantic}), semantic


def _erf(model: torch.nn.Module, erf_cfg: Mapping[str, Any], test_spec: Mapping[str, Any], device: torch.device,
         out: Path) -> dict[str, Any]:
    """ERF of the trained model on the clean images of the first test set (centre crops)."""
    from harness.erf import area_ratios, compute_erf

    source = build_dataset(dict(test_spec))
    n = min(int(erf_cfg.get("images", 8)), len(source))
    images = [source.load(i).gt for i in range(n)]
    erf_map, info = compute_erf(model, images, rectifier=erf_cfg.get("rectifier", "abs"), device=device,
                                input_size=int(erf_cfg.get("size", 128)), return_info=True)
    thresholds = tuple(float(t) for t in erf_cfg.get("thresholds", (0.2, 0.3, 0.5, 0.99)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez_compressed(tmp, erf=erf_map.astype(np.float32))
    tmp.replace(out)
    return {"area_ratios": {str(k): float(v) for k, v in area_ratios(erf_map, thresholds).items()},
            "scaling": erf_cfg.get("scaling", "power0.25"), "images": getattr(source, "dataset_name", "?"),
            "info": {k: (v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v) for k, v in info.items()}}


def run_study_job(cfg: Mapping[str, Any], *, experiment: str, swept: Mapping[str, Any] | None = None,
                  run_name: str | None = None) -> dict[str, Any]:
    """Run (or skip, when complete) one variant x seed of a study and store its record."""
    cfg = _plain(dict(cfg))
    variant = str(cfg.get("variant"))
    run_hash, semantic = study_identity(cfg, experiment)
    model_cfg, data = semantic["model"], semantic["data"]
    meta = dict(model_cfg.get("meta") or {})
    store = Store(cfg["store_dir"])
    existing = store.finished(run_hash, force=bool(cfg.get("force", False)))
    if existing is not None:
        return existing
    settings = TrainSettings.from_config(cfg["train"])
    device = resolve_device(str(cfg["hardware"].get("device", "cpu")))
    threads = configure_threads(cfg["hardware"].get("threads"))
    run_dir = Path(cfg.get("runs_dir", "runs")) / run_hash
    record: dict[str, Any] = {
        "config_hash": run_hash, "experiment": experiment, "variant": variant,
        "run_name": run_name or f"{variant},seed={cfg['seed']}", "model": meta.get("preset"),
        "family": meta.get("family"), "task": cfg["task"].get("name"), "seed": cfg["seed"],
        "swept": dict(swept or {"variant": variant}), "config": semantic, "status": "running",
        "started_at": time.time(), "run_dir": str(run_dir), "environment": {**environment(device), "cpu_threads": threads},
        "study_variants": list((cfg.get("study") or {}).get("variants") or []),
    }
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        torch.manual_seed(cfg["seed"])
        model = build(model_cfg).to(device)
        t = time.perf_counter()
        record["profile"] = profile_model(model, cfg, meta, device)
        timings["profile_s"] = time.perf_counter() - t
        kwargs = evaluation_settings(cfg, meta, device)
        task = cfg["task"]
        if settings.iters > 0:
            base = build_dataset(data["train"])
            online = task.get("train_degradation") if task.get("online_degradation", True) else None
            patches = PatchDataset(base, settings.patch_size, augment=bool(data.get("augment", True)),
                                   online_degradation=online, seed=cfg["seed"])
            val_set = build_dataset(data["val"]) if data.get("val") else None
            val_time = [0.0]

            def validate(m):
                t_val = time.perf_counter()
                res = evaluate(m, val_set, **{**kwargs, "metrics": ("psnr",)}, limit=data.get("val_limit"),
                               score_input=False)["results"]
                val_time[0] += time.perf_counter() - t_val
                return {"psnr": res["psnr"].mean}

            t = time.perf_counter()
            trained = train(model, patches, settings, device=device, seed=cfg["seed"], run_dir=run_dir,
                            validate=validate if val_set is not None and settings.val_every else None,
                            progress=bool(cfg.get("progress", True)))
            timings["train_s"] = time.perf_counter() - t
            steps = settings.iters - int(trained["resumed_from"] or 0)
            record["train"] = {k: trained[k] for k in ("history", "iters_done", "resumed_from", "time_s")}
            record["train"].update({"val_time_s": val_time[0], "steps_timed": steps,
                                    "ms_per_step": 1000.0 * (trained["time_s"] - val_time[0]) / max(1, steps),
                                    "val_set": (data.get("val") or {}).get("name"),
                                    "val_limit": data.get("val_limit")})
            if trained["ema"] is not None:
                model = trained["ema"]
        store_root = Path(cfg["store_dir"])
        if (cfg.get("sets") or {}).get("save_weights", True):
            path = store_root / "weights" / f"{run_hash}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            record["weights"] = str(path.relative_to(store_root))
        tests: dict[str, Any] = {}
        t = time.perf_counter()
        for name, spec in data["tests"].items():
            out = evaluate(model, build_dataset(spec), **kwargs, limit=data.get("test_limit"))
            if out["nonfinite"]:
                raise FloatingPointError(f"non-finite model output on {name}: {out['nonfinite'][:5]}")
            tests[name] = {"metrics": summarise(out["results"]),
                           "input_metrics": {m: r.mean for m, r in out["input_results"].items()},
                           "images": out["images"], "time_s": out["time_s"]}
        timings["eval_s"] = time.perf_counter() - t
        record["tests"] = tests
        first = next(iter(tests))
        record["dataset"], record["metrics"] = first, tests[first]["metrics"]
        record["input_metrics"] = tests[first]["input_metrics"]
        if cfg.get("erf") and cfg["erf"].get("enabled"):
            t = time.perf_counter()
            rel = Path("erf") / f"{run_hash}.npz"
            record["erf"] = {**_erf(model, cfg["erf"], data["tests"][first], device, store_root / rel),
                             "file": str(rel)}
            timings["erf_s"] = time.perf_counter() - t
        record["status"] = "ok"
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - a failed run is a record; the sweep goes on
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
    timings["total_s"] = time.perf_counter() - t_start
    record["timings"] = timings
    record["finished_at"] = time.time()
    store.put(record)
    return record


def write_json(path: Path, obj: Any) -> None:
    import json

    atomic_write_text(Path(path), json.dumps(obj, indent=1, sort_keys=True, default=str))
