"""Run a study's variants x seeds on one GPU as K concurrent processes, within a deadline.

    python -m harness.study_gpu --root .data --out "$OUT" --jobs 4 --deadline 540 --seeds 0,1,2

* Every (variant, seed) of the experiment is composed with Hydra's compose API (the same
  config as ``python run.py -m experiment=... variant=... seed=...``) and run by
  :func:`harness.study.run_study_job` in one of K long-lived worker processes (CUDA context and
  compiled kernels are kept between runs). Finished configurations in the store are skipped,
  so a later call adds what is missing.
* Jobs go seed-major (every variant at the first seed, then the next seed), so a call cut
  short still covers the variants evenly.
* Deadline: a run is launched only if it can end before ``--deadline`` seconds after start
  (its estimate: the longest finished run so far, else ``--estimate``); at the deadline the
  runs still going are stopped (their checkpoints stay in ``--runs``; nothing half-written
  is stored).
* After each run ends, ``$OUT/records.tar`` (``records/*.json`` and ``erf/*.npz`` of the
  experiment) and ``$OUT/driver.json`` (per-run start/end, worker, runs per hour, the
  concurrency probe) are rewritten atomically, so a call that is killed still returns them.
  Unpack with ``tar -xf records.tar -C reports/<experiment>``.
* ``--probe 1,2,4``: before the study, K processes train the reference variant together for
  ``--probe-iters`` steps at each K; aggregate steps/s per K is recorded and ``--jobs auto``
  takes the fastest K.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import queue
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence


def compose(experiment: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The plain config of ``experiment`` with ``overrides``, as run.py would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from harness.models.registry import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"experiment={experiment}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def sweep_variants(experiment: str) -> list[str]:
    """The ``variant`` values the experiment file sweeps (its hydra.sweeper.params)."""
    import yaml

    from harness.models.registry import CONF_DIR

    spec = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()) or {}
    swept = ((spec.get("hydra") or {}).get("sweeper") or {}).get("params", {}).get("variant")
    if not swept:
        raise SystemExit(f"experiment {experiment!r} sweeps no `variant`; pass --variants")
    return [v.strip() for v in str(swept).split(",")]


def _threads(jobs: int) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, jobs)))


def _worker(jobs_q, results_q, worker: int, n_jobs: int) -> None:
    """Run jobs from ``jobs_q`` until ``None``; report start/end on ``results_q``."""
    _threads(n_jobs)
    from harness.study import run_study_job

    while True:
        job = jobs_q.get()
        if job is None:
            return
        results_q.put({"event": "start", "key": job["key"], "worker": worker, "time": time.time()})
        try:
            rec = run_study_job(job["cfg"], experiment=job["experiment"], swept=job["swept"])
            results_q.put({"event": "end", "key": job["key"], "worker": worker, "time": time.time(),
                           "status": rec.get("status"), "skipped": bool(rec.get("skipped")),
                           "config_hash": rec.get("config_hash"), "error": rec.get("error"),
                           "timings": rec.get("timings"), "ms_per_step": (rec.get("train") or {}).get("ms_per_step")})
        except BaseException as err:  # noqa: BLE001 - a config error is reported, the worker goes on
            results_q.put({"event": "end", "key": job["key"], "worker": worker, "time": time.time(),
                           "status": "error", "error": f"{type(err).__name__}: {err}"})


def _probe_worker(cfg: dict, iters: int, warmup: int, n_jobs: int, barrier, results_q) -> None:
    """Train the variant of ``cfg`` for ``warmup`` then ``iters`` steps; report ms/step of the latter."""
    _threads(n_jobs)
    import torch

    from harness.data import PatchDataset, build_dataset
    from harness.models import build
    from harness.runner import resolve_device
    from harness.study import study_identity
    from harness.train import TrainSettings, train

    try:
        _, semantic = study_identity(cfg, cfg.get("experiment_name", "study"))
        device = resolve_device(str(cfg["hardware"].get("device", "cpu")))
        model = build(semantic["model"]).to(device)
        patches = PatchDataset(build_dataset(semantic["data"]["train"]), int(cfg["train"]["patch_size"]),
                               online_degradation=cfg["task"].get("train_degradation"), seed=int(cfg["seed"]))
        base = {**cfg["train"], "val_every": 0, "ckpt_every": 0}
        train(model, patches, TrainSettings.from_config({**base, "iters": warmup}), device=device, progress=False)
        barrier.wait(timeout=600)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out = train(model, patches, TrainSettings.from_config({**base, "iters": iters}), device=device,
                    progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results_q.put({"ms_per_step": 1000.0 * out["time_s"] / iters})
    except BaseException as err:  # noqa: BLE001
        results_q.put({"error": f"{type(err).__name__}: {err}"})
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass


def probe(cfg: dict, ks: Sequence[int], iters: int, warmup: int) -> list[dict[str, Any]]:
    """Aggregate training throughput of K concurrent processes, for each K in ``ks``."""
    ctx = mp.get_context("spawn")
    rows = []
    for k in ks:
        results_q, barrier = ctx.Queue(), ctx.Barrier(k)
        procs = [ctx.Process(target=_probe_worker, args=(cfg, iters, warmup, k, barrier, results_q)) for _ in range(k)]
        t0 = time.time()
        for p in procs:
            p.start()
        outs = [results_q.get(timeout=900) for _ in procs]
        for p in procs:
            p.join()
        errors = [o["error"] for o in outs if "error" in o]
        ms = [o["ms_per_step"] for o in outs if "ms_per_step" in o]
        rows.append({"k": k, "ms_per_step_each": ms, "errors": errors, "wall_s": time.time() - t0,
                     "steps_per_s": sum(1000.0 / m for m in ms) if ms and not errors else None})
        base = rows[0].get("steps_per_s")
        if base and rows[-1]["steps_per_s"]:
            rows[-1]["speedup_vs_first"] = rows[-1]["steps_per_s"] / base
    return rows


def pack(store: Path, experiment: str, out: Path) -> int:
    """Write ``out/records.tar`` (the experiment's records and ERF maps) atomically; returns #records."""
    from harness.store import Store

    records = Store(store).records(experiment)
    tmp = out / ".records.tar.tmp"
    with tarfile.open(tmp, "w") as tar:
        for rec in records:
            data = json.dumps(rec, indent=1, sort_keys=True).encode()
            info = tarfile.TarInfo(f"records/{rec['config_hash']}.json")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            erf = (rec.get("erf") or {}).get("file")
            if erf and (store / erf).is_file():
                tar.add(store / erf, arcname=erf)
    os.replace(tmp, out / "records.tar")
    return len(records)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", default="ablation_gray25")
    ap.add_argument("--root", required=True, help="sets.root: folder with the training and test sets")
    ap.add_argument("--out", required=True, help="where records.tar and driver.json are written")
    ap.add_argument("--store", default=None, help="store directory (default: the experiment's store_dir)")
    ap.add_argument("--runs", default="results/runs", help="run folders (checkpoints)")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default: the experiment's sweep)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", default="4", help="concurrent runs on the GPU, or 'auto' (needs --probe)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds from start by which runs must end")
    ap.add_argument("--estimate", type=float, default=180.0, help="assumed run time before one has finished")
    ap.add_argument("--hardware", default="cuda")
    ap.add_argument("--probe", default=None, help="comma-separated K values to time before the study")
    ap.add_argument("--probe-iters", type=int, default=50)
    ap.add_argument("--probe-warmup", type=int, default=10)
    ap.add_argument("--no-study", action="store_true", help="only the probe")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. train.iters=1000")
    args = ap.parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"sets.root={args.root}", f"hardware={args.hardware}", "progress=false", f"runs_dir={args.runs}",
              *args.overrides]
    if args.store:
        common.append(f"store_dir={args.store}")
    first = compose(args.experiment, common)
    store = Path(first["store_dir"])
    variants = args.variants.split(",") if args.variants else sweep_variants(args.experiment)
    variants = [v.strip() for v in variants if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    state: dict[str, Any] = {"experiment": args.experiment, "argv": list(argv) if argv is not None else None,
                             "started_at": t_start, "deadline_s": args.deadline, "variants": variants, "seeds": seeds,
                             "runs": {}, "probe": None}

    def dump() -> None:
        from harness.study import write_json

        state["elapsed_s"] = time.time() - t_start
        done = [r for r in state["runs"].values() if r.get("status") == "ok" and not r.get("skipped")]
        if done:
            span = max(r["end"] for r in done) - min(r["start"] for r in done)
            state["runs_completed"] = len(done)
            state["runs_per_hour"] = 3600.0 * len(done) / span if span > 0 else None
        write_json(out / "driver.json", state)

    if args.probe:
        ref = ((first.get("study") or {}).get("reference")) or variants[0]
        cfg = compose(args.experiment, [*common, f"variant={ref}", "seed=0"])
        state["probe"] = {"variant": ref, "iters": args.probe_iters, "warmup": args.probe_warmup,
                          "results": probe(cfg, [int(k) for k in args.probe.split(",")], args.probe_iters,
                                           args.probe_warmup)}
        dump()
        print(json.dumps(state["probe"], indent=1), flush=True)
    if args.no_study:
        return state
    if args.jobs == "auto":
        rows = [r for r in (state["probe"] or {}).get("results", []) if r.get("steps_per_s")]
        if not rows:
            raise SystemExit("--jobs auto needs a successful --probe")
        n_jobs = max(rows, key=lambda r: r["steps_per_s"])["k"]
    else:
        n_jobs = int(args.jobs)
    state["jobs"] = n_jobs
    pending = []
    for s in seeds:
        for v in variants:
            cfg = compose(args.experiment, [*common, f"variant={v}", f"seed={s}"])
            pending.append({"key": f"{v},seed={s}", "cfg": cfg, "experiment": args.experiment,
                            "swept": {"variant": v, "seed": s}})
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    workers: dict[int, Any] = {}  # started on first use: a call with nothing to launch starts none
    job_qs: dict[int, Any] = {}
    busy: dict[int, str] = {}
    durations: list[float] = []
    dump()
    while pending or busy:
        now = time.time()
        estimate = max(durations) if durations else args.estimate
        for w in range(n_jobs):
            if w not in busy and pending and now - t_start + estimate <= args.deadline:
                job = pending.pop(0)
                if w not in workers:
                    job_qs[w] = ctx.Queue()
                    workers[w] = ctx.Process(target=_worker, args=(job_qs[w], results_q, w, n_jobs), daemon=True)
                    workers[w].start()
                busy[w] = job["key"]
                state["runs"][job["key"]] = {"worker": w, "queued": now}
                job_qs[w].put(job)
        if not busy:
            break  # nothing running and nothing launchable before the deadline
        try:
            msg = results_q.get(timeout=max(0.5, min(5.0, args.deadline - (time.time() - t_start))))
        except queue.Empty:
            if time.time() - t_start > args.deadline:
                for w, key in busy.items():
                    workers[w].kill()
                    state["runs"][key].update({"status": "stopped at deadline"})
                busy.clear()
            continue
        run = state["runs"].setdefault(msg["key"], {})
        if msg["event"] == "start":
            run.update({"start": msg["time"], "concurrent": len(busy)})
            continue
        run.update({k: v for k, v in msg.items() if k not in ("event", "key")})
        run["end"] = msg["time"]
        busy.pop(msg["worker"], None)
        if msg.get("status") == "ok" and not msg.get("skipped") and "start" in run:
            durations.append(run["end"] - run["start"])
        n = pack(store, args.experiment, out)
        state["records_packed"] = n
        dump()
        print(f"[{time.time() - t_start:6.0f}s] {msg['key']}: {msg.get('status')}"
              f"{' (skipped)' if msg.get('skipped') else ''} {msg.get('error') or ''}", flush=True)
    state["not_launched"] = [j["key"] for j in pending]
    for q in job_qs.values():
        q.put(None)
    for p in workers.values():
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    state["records_packed"] = pack(store, args.experiment, out)
    dump()
    return state


if __name__ == "__main__":
    main()
