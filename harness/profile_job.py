"""Profiling jobs that are not train/evaluate runs: the paper-efficiency table and the ladder."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import torch

from harness.models import create, preset_meta
from harness.profile import count_flops, count_params, environment
from harness.record import RunRecord
from harness.store import Store, config_hash


def flops_verified_linear(model: torch.nn.Module, shape: list[int],
                          probe_sizes: tuple[int, int]) -> tuple[int, int, str]:
    """FLOPs at ``shape``: counted at two probe sizes; if they prove exact pixel-linearity, scaled.

    Counts c1 at p1×p1 and c2 at p2×p2 are linear in pixels when c2·p1² = c1·p2²; then the count
    at H×W is c1·(H·W)/p1². fvcore prints einsum counts with four significant digits, so the
    check allows a relative 1e-4; a model that fails it is counted at ``shape`` directly.
    Returns (total, convolution-only total, method).
    """
    p1, p2 = probe_sizes
    h, w = shape[-2:]
    r1 = count_flops(model, [*shape[:-2], p1, p1])
    c1, c2 = r1.total, count_flops(model, [*shape[:-2], p2, p2]).total
    if abs(c2 * p1 * p1 - c1 * p2 * p2) <= 1e-4 * c2 * p1 * p1:
        scale = h * w / (p1 * p1)
        return round(c1 * scale), round(r1.conv_only * scale), f"verified linear ({p1}² and {p2}² counts, scaled)"
    full = count_flops(model, shape)
    return full.total, full.conv_only, "counted at the input size"


def run_efficiency_job(cfg: Mapping[str, Any], *, experiment: str) -> dict[str, Any]:
    """One record per preset: params and FLOPs against the official figures (no training)."""
    eff = cfg["efficiency"]
    store = Store(cfg["store_dir"])
    device = torch.device("cpu")
    env = environment(device)
    records = []
    for preset in eff["presets"]:
        run_hash = config_hash({"experiment": experiment, "preset": preset, "efficiency": dict(eff)})
        if store.is_complete(run_hash) and not cfg.get("force"):
            records.append(store.get(run_hash))
            continue
        run = RunRecord(config_hash=run_hash, experiment=experiment, run_name=preset, model=preset, environment=env,
                        started_at=time.time())
        t0 = time.perf_counter()
        try:
            meta = preset_meta(preset)
            run.family = meta.get("family")
            model = create(preset)
            params = count_params(model)
            shape = list(meta.get("flops_input") or [1, 3, 256, 256])
            if eff.get("verified_linear", True):
                total, conv, method = flops_verified_linear(model, shape, tuple(eff.get("probe_sizes", (64, 128))))
            else:
                full = count_flops(model, shape)
                total, conv, method = full.total, full.conv_only, "counted at the input size"
            official = {"params": meta.get("official_params"), "gflops": meta.get("official_gflops"),
                        "gflops_conv_only": meta.get("official_gflops_conv_only")}
            run.profile = {"params": params, "gmacs": total / 1e9, "flops_input": shape, "flops_method": method,
                           "gmacs_conv_only": conv / 1e9}
            run.official = official
            run.status = "ok"
        except Exception as err:  # noqa: BLE001 - one bad preset must not stop the table
            run.status = "failed"
            run.error = f"{type(err).__name__}: {err}"
            run.traceback = traceback.format_exc()
        run.timings = {"total_s": time.perf_counter() - t0}
        run.finished_at = time.time()
        record = run.to_dict()
        store.put(record)
        records.append(record)
    ok = sum(r.get("status") == "ok" for r in records)
    return {"run_name": experiment, "status": "ok" if ok == len(records) else "failed",
            "metrics": {}, "records": len(records), "error": None if ok == len(records) else
            f"{len(records) - ok} presets failed"}


def run_ladder_job(cfg: Mapping[str, Any], *, experiment: str) -> dict[str, Any]:
    """Cost versus resolution for ``cfg.scaling.presets``; one record per (preset, size) row."""
    from harness.profile.ladder import plot_ladder, resolution_ladder

    sc = cfg["scaling"]
    device = torch.device(str(cfg["hardware"].get("device", "cpu")))
    store = Store(cfg["store_dir"])
    env = environment(device)
    df = resolution_ladder(list(sc["presets"]), [int(s) for s in sc["sizes"]], device=device,
                           measure=tuple(sc.get("measure", ("latency", "flops"))),
                           repeats=int(sc.get("repeats", 5)), warmup=int(sc.get("warmup", 3)))
    for row in df.to_dict("records"):
        row = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        name = f"{row.get('model')}@{row.get('height', row.get('size'))}"
        ok = row.get("status") == "ok"
        run = RunRecord(config_hash=config_hash({"experiment": experiment, "row": name, "scaling": dict(sc),
                                                 "device": str(device)}),
                        experiment=experiment, run_name=name, model=row.get("model"), family=row.get("family"),
                        status="ok" if ok else "failed", error=None if ok else row.get("status"),
                        profile={"params": row.get("params"), "gmacs": row.get("gmacs"),
                                 "latency_ms": row.get("latency_median_ms"), "peak_mem_mb": row.get("peak_mem_mb"),
                                 "latency_precision": row.get("precision")},
                        swept={"size": row.get("height", row.get("size"))}, environment=env,
                        finished_at=time.time(), extra={"ladder_row": row})
        store.put(run.to_dict())
    out = Path(cfg["report_dir"])
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "ladder.csv", index=False)
    caption = f"{env.get('device')} ({env.get('cpu')}), torch {env.get('torch')}, fp32, batch 1"
    for metric in sc.get("measure", ("latency", "flops")):
        plot_ladder(df, out / "figures" / f"ladder_{metric}.png", metric, caption=caption)
    return {"run_name": experiment, "status": "ok", "metrics": {}, "rows": len(df)}
