"""The run record: one schema for what the runner and the profile jobs store and the report reads.

A record is one JSON file in the store (``harness.store``). ``RunRecord`` lists its fields;
``COLUMNS`` lists the flat result columns a record gives (``flatten_record``, one row of
``results.csv``), each with its unit and where it comes from. A run's *swept* fields are exactly
the keys of ``RunRecord.swept`` (the overrides that name the run, e.g. ``model.heads``), never
guessed from which columns are unknown.

The multiply-add count has one name inside the harness, ``gmacs`` (giga multiply-adds at
``flops_input``; fvcore's convention, which the papers print as "GFLOPs"). The public
``results.csv`` column for it is ``gflops`` (README, "Reading a report"), and tables label it
``TABLE_LABELS["gflops"]``. Records written before this schema load unchanged (``from_dict``
keeps unknown keys in ``extra``; the profile block always used ``gmacs``).

The profile block (``harness.runner.profile_model``): ``params`` (count); ``gmacs``,
``gmacs_conv_only`` (1e9 multiply-adds) at ``flops_input`` (B, C, H, W); ``latency_ms`` (median),
``latency_p90_ms``, ``latency_min_ms`` (ms) of ``latency_repeats`` timed forwards at
``latency_input`` under ``latency_precision`` ("fp32" = strict, TF32 off) with
``precision_flags`` (the TF32 / matmul-precision / autocast settings in force while timing);
``peak_mem_mb`` (MiB; CPU: resident memory the forward added, CUDA: the allocator's peak) by
``peak_mem_method``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

STATUSES = ("running", "ok", "failed")


@dataclass
class RunRecord:
    """One run (or one row of a profile job): identity, configuration, environment, results."""

    config_hash: str
    experiment: str
    run_name: str
    model: str | None = None
    family: str | None = None
    task: str | None = None
    seed: int | None = None
    swept: dict[str, Any] = field(default_factory=dict)  # overrides that name the run: {"model.heads": "4"}
    config: dict[str, Any] | None = None  # the semantic part of the composed config
    status: str = "running"  # running | ok | failed
    error: str | None = None
    traceback: str | None = None
    started_at: float | None = None  # Unix seconds
    finished_at: float | None = None
    run_dir: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)  # harness.profile.environment + cpu_threads
    profile: dict[str, Any] = field(default_factory=dict)  # see "The profile block" in the module docstring
    metrics: dict[str, Any] = field(default_factory=dict)  # metric -> {mean, values, names, protocol}
    input_metrics: dict[str, float] = field(default_factory=dict)  # the degraded input's mean scores
    dataset: str | None = None
    data_digest: str | None = None  # sha256 over the test set's files (None for the embedded photos)
    nonfinite: list[str] | None = None  # images whose output was not finite
    train: dict[str, Any] | None = None  # history, iters_done, resumed_from, time_s, world_size
    checkpoint: dict[str, Any] | None = None  # what harness.checkpoints.load_weights used
    erf: dict[str, Any] | None = None  # area_ratios, files, scaling
    official: dict[str, Any] | None = None  # published params / gflops for the paper_efficiency table
    timings: dict[str, float] = field(default_factory=dict)  # profile_s, train_s, eval_s, total_s
    extra: dict[str, Any] = field(default_factory=dict)  # job-specific blocks (e.g. ladder_row), older keys

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored on disk: the fields, then ``extra``'s keys at the top level."""
        out = {}
        for f in dataclasses.fields(self):  # fields left at an empty default are not written
            value = getattr(self, f.name)
            if f.name != "extra" and (f.name == "status" or value not in (None, {}, [])):
                out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunRecord":
        """Read a stored record (any version); keys that are not fields go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("config_hash", "experiment") if k not in data]
        if missing:
            raise ValueError(f"a run record needs {missing}; got keys {sorted(data)}")
        known = {k: v for k, v in data.items() if k in names}
        known.setdefault("run_name", data.get("run_name") or data["config_hash"])
        for key in ("swept", "environment", "profile", "metrics", "input_metrics", "timings"):
            if known.get(key) is None:
                known.pop(key, None)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


@dataclass(frozen=True)
class Column:
    """One column of ``results.csv``: name, unit, and how it is read from a record."""

    name: str
    unit: str
    get: Callable[[Mapping[str, Any]], Any]
    label: str = ""  # table header; the name when empty

    @property
    def header(self) -> str:
        return self.label or self.name


def _profile(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda r: (r.get("profile") or {}).get(key)


def _shape(key: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda r: "x".join(str(s) for s in (r.get("profile") or {}).get(key) or []) or None


# Identity columns: which run a row is (the report labels runs by their swept values instead).
IDENTITY_COLUMNS = (
    Column("experiment", "", lambda r: r.get("experiment")),
    Column("run", "", lambda r: r.get("run_name")),
    Column("model", "", lambda r: r.get("model")),
    Column("family", "", lambda r: r.get("family")),
    Column("task", "", lambda r: r.get("task")),
    Column("seed", "", lambda r: r.get("seed")),
    Column("status", "", lambda r: r.get("status")),
    Column("config_hash", "", lambda r: r.get("config_hash")),
)
# Cost columns (interface names: params, gflops, latency_ms, peak_mem_mb, device).
COST_COLUMNS = (
    Column("params", "parameters", _profile("params"), "params (M)"),
    Column("gflops", "1e9 multiply-adds at flops_input", _profile("gmacs"), "GFLOPs (MACs)"),
    Column("flops_input", "BxCxHxW", _shape("flops_input")),
    Column("latency_ms", "ms (median forward at latency_input)", _profile("latency_ms"), "latency (ms)"),
    Column("latency_input", "BxCxHxW", _shape("latency_input")),
    Column("peak_mem_mb", "MiB", _profile("peak_mem_mb"), "peak mem (MB)"),
    Column("device", "", lambda r: (r.get("environment") or {}).get("device")),
    Column("threads", "", lambda r: (r.get("environment") or {}).get("threads")),
)
TRAILING_COLUMNS = (
    Column("train_s", "s", lambda r: (r.get("timings") or {}).get("train_s")),
    Column("error", "", lambda r: r.get("error")),
)
TABLE_LABELS = {c.name: c.header for c in (*IDENTITY_COLUMNS, *COST_COLUMNS)}


def swept_keys(record: Mapping[str, Any]) -> list[str]:
    """The record's swept fields that are columns of their own (``model`` is already one)."""
    identity = {c.name for c in IDENTITY_COLUMNS}
    return [k for k in (record.get("swept") or {}) if k not in identity]


def flatten_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One row of ``results.csv``: identity, swept fields, cost, metrics, input metrics, ERF, official."""
    from harness.metrics import METRICS

    row = {c.name: c.get(record) for c in IDENTITY_COLUMNS}
    row.update({k: (record.get("swept") or {})[k] for k in swept_keys(record)})
    row.update({c.name: c.get(record) for c in COST_COLUMNS})
    metrics = record.get("metrics") or {}
    for metric in [m for m in METRICS if m in metrics] + [m for m in metrics if m not in METRICS]:
        value = metrics[metric]
        row[metric] = value.get("mean") if isinstance(value, Mapping) else value
    for metric, value in (record.get("input_metrics") or {}).items():
        row[f"input_{metric}"] = value
    for t, ratio in ((record.get("erf") or {}).get("area_ratios") or {}).items():
        row[f"erf_area@{t}"] = ratio
    row.update(official_columns(record, row))
    row.update({c.name: c.get(record) for c in TRAILING_COLUMNS})
    return row


def official_columns(record: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """Published params / GFLOPs beside ours and the differences (records with an ``official`` block)."""
    official = record.get("official") or {}
    if not official:
        return {}
    profile = record.get("profile") or {}
    out: dict[str, Any] = {"flops_method": profile.get("flops_method"), "official_params": official.get("params"),
                           "official_gflops": official.get("gflops")}
    if official.get("params") is not None and row.get("params") is not None:
        out["params_diff"] = row["params"] - official["params"]
    if official.get("gflops") and row.get("gflops") is not None:
        out["gflops_diff_pct"] = 100.0 * (row["gflops"] - official["gflops"]) / official["gflops"]
    if official.get("gflops_conv_only") is not None:
        out["gflops_conv_only"] = profile.get("gmacs_conv_only")
        out["official_gflops_conv_only"] = official["gflops_conv_only"]
    return out
