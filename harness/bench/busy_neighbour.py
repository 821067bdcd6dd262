"""CPU training under a busy neighbour: seconds per training iteration with and without another
process holding a core, for the thread policies of ``harness/hardware.py``.

    python -m harness.bench.busy_neighbour --out reports/hardware/cpu

Each trial is a fresh process (the OpenMP wait policy is read when torch loads) that trains
``--preset`` (default eamamba_tiny) as the quickstart does: AdamW, L1 loss, batches of 4 patches
of 48², fp32; it runs ``--warmup`` untimed iterations, then times ``--iters`` (fewer when they
take longer than ``--max-time-s``, at least 3) and reports their median. A *neighbour* is a
process that spins on one core (``while True: pass``) for the whole trial. Policies:

- ``default``: what a PyTorch user gets: one thread per core, the OpenMP runtime's own wait policy
  (idle threads spin before they sleep); torch is imported before harness, so nothing changes it.
- ``passive``: one thread per core, ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once).
- ``auto``: what the runner does (``hardware.threads`` null or auto): passive waiting and as many threads
  as cores left free by other processes (``harness.hardware.configure_threads``).

Every (policy, neighbours) cell is repeated ``--repeats`` times in an interleaved order, and the
table shows the median over repeats, the range, and how many cores other processes kept busy
just before each trial (the machine may be shared). Writes ``OUT/busy_neighbour.csv`` (one row
per trial), ``OUT/busy_neighbour.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("default", "passive", "auto")
NEIGHBOUR_CODE = "while True: pass"
# A trial imports torch before harness for the "default" policy (harness/__init__.py would ask for
# passive waiting otherwise), so it starts with -c rather than -m harness.bench.busy_neighbour.
TRIAL_CODE = ("import json, sys\n"
              "if sys.argv[1] == 'default':\n    import torch\n"
              "from harness.bench.busy_neighbour import _trial_main\n"
              "print('TRIAL ' + json.dumps(_trial_main(json.loads(sys.argv[2]))), flush=True)\n")


def _trial_main(spec: dict) -> dict:
    """The body of one trial process: train ``spec['preset']`` and time its iterations."""
    from harness.hardware import busy_cores, configure_threads

    busy_before = busy_cores(0.5)
    choice = configure_threads("auto" if spec["policy"] == "auto" else "torch")
    import torch

    from harness.models import create

    torch.manual_seed(0)
    model = create(spec["preset"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    size, batch = spec["patch"], spec["batch"]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, size, size, generator=gen), torch.rand(batch, 3, size, size, generator=gen)

    def step() -> None:
        loss = (model(x) - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(spec["warmup"]):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < spec["iters"] and (len(times) < 3 or time.perf_counter() - start < spec["max_time_s"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "iterations": len(times),
            "threads": choice["threads"], "wait_policy": choice["wait_policy"], "busy_cores_before": busy_before}


def _run_trial(spec: dict, neighbours: int, timeout_s: float) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if spec["policy"] != "default":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    spinners = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR_CODE]) for _ in range(neighbours)]
    try:
        time.sleep(0.5 if neighbours else 0.0)  # the neighbour is running before the trial starts
        proc = subprocess.run([sys.executable, "-c", TRIAL_CODE, spec["policy"], json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout_s)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TRIAL ")]
    if not lines:
        raise RuntimeError(f"trial failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(lines[-1][len("TRIAL "):])


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (policy, neighbours): median over repeats of the per-trial medians, and range."""
    out = []
    for policy in POLICIES:
        for neighbours in sorted({r["neighbours"] for r in rows}):
            cell = [r for r in rows if r["policy"] == policy and r["neighbours"] == neighbours]
            if not cell:
                continue
            medians = [r["median_s"] for r in cell]
            out.append({"policy": policy, "neighbours": neighbours, "threads": "/".join(sorted({str(r["threads"])
                                                                                                for r in cell})),
                        "wait_policy": cell[0]["wait_policy"], "s_per_iter": statistics.median(medians),
                        "min_s": min(medians), "max_s": max(medians), "trials": len(cell),
                        "busy_cores_before": statistics.median(r["busy_cores_before"] or 0.0 for r in cell)})
    idle = {r["policy"]: r["s_per_iter"] for r in out if r["neighbours"] == 0}
    for r in out:
        r["slowdown_vs_idle"] = r["s_per_iter"] / idle[r["policy"]] if idle.get(r["policy"]) else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="eamamba_tiny")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--neighbours", nargs="+", type=int, default=[0, 1], help="spinning processes per trial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--max-time-s", type=float, default=20.0, help="time budget of a trial's timed iterations")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--out", default=None, help="folder for busy_neighbour.csv and busy_neighbour.md")
    args = parser.parse_args(argv)
    import pandas as pd

    from harness.profile.environment import environment
    from harness.report.markdown import markdown_table

    rows = []
    for repeat in range(args.repeats):  # interleaved, so a change in the machine's load hits every cell
        for neighbours in args.neighbours:
            for policy in args.policies:
                spec = {"policy": policy, "preset": args.preset, "warmup": args.warmup, "iters": args.iters,
                        "max_time_s": args.max_time_s, "batch": args.batch, "patch": args.patch}
                row = {"repeat": repeat, "policy": policy, "neighbours": neighbours,
                       **_run_trial(spec, neighbours, args.timeout_s)}
                rows.append(row)
                print(f"repeat {repeat} policy {policy:8s} neighbours {neighbours}: {row['median_s']:.3f} s/iter "
                      f"({row['threads']} threads, {row['wait_policy']} wait, {row['iterations']} iterations; "
                      f"others kept {row['busy_cores_before']:.2f} cores busy before)", file=sys.stderr, flush=True)
    table = summarise(rows)
    digits = {"s_per_iter": 3, "min_s": 3, "max_s": 3, "busy_cores_before": 2, "slowdown_vs_idle": 2}
    md = markdown_table(table, digits=digits)
    env = environment()
    print(f"environment: {', '.join(f'{k}={v}' for k, v in env.items())}")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out / "busy_neighbour.csv", index=False)
        argv_text = " ".join(sys.argv[1:] if argv is None else argv)
        (out / "busy_neighbour.md").write_text(
            f"# Training under a busy neighbour ({args.preset}, {args.batch}x{args.patch}², AdamW, fp32)\n\n"
            f"Command: `python -m harness.bench.busy_neighbour {argv_text}`\n\n"
            f"Environment: {json.dumps(env, default=str)}\n\n"
            f"Seconds per training iteration: median over {args.repeats} trials (each the median of up to "
            f"{args.iters} timed iterations after {args.warmup} untimed); min_s/max_s: range of the trials' "
            "medians; busy_cores_before: cores other processes kept busy just before the trials (median); "
            "slowdown_vs_idle: against the same policy with no neighbour.\n\n" + md)
        print(f"wrote {out / 'busy_neighbour.csv'} and {out / 'busy_neighbour.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
