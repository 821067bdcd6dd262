"""Job kinds: what one composed config runs, picked by its ``job`` key (``conf/config.yaml``).

``JOB_KINDS`` maps a kind to ``"module:function"``; the module is imported only when a job of
that kind runs. A job function takes the resolved config (a plain dict) and keyword arguments:
``experiment`` always, and those of ``model_name`` (the model group's choice), ``swept`` (the
overrides that name the job) and ``run_name`` that it declares. It returns a record-like dict
(``run_name``, ``status``, optional ``metrics``, ``error``, ``skipped``). A new kind is one line
here, or ``register_job("kind", "package.module:function")`` from an extension.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

JOB_KINDS: dict[str, str] = {
    "run": "harness.runner:run_job",  # train / evaluate / profile one configuration
    "efficiency": "harness.profile_job:run_efficiency_job",  # params and FLOPs of presets vs official
    "ladder": "harness.profile_job:run_ladder_job",  # cost versus resolution
    "study": "harness.study:run_study_job",  # one variant x seed of an ablation study
    "table": "harness.tables:run_table_job",  # a published table's cells: ours / published / delta
    "release_table": "harness.release_table:run_release_table_job",  # the release's evaluation layouts
}


@dataclass(frozen=True)
class JobIdentity:
    """Which job this is: the experiment, the model group's choice and the overrides that name it."""

    experiment: str = "default"
    model_name: str | None = None
    swept: Mapping[str, str] = field(default_factory=dict)

    @property
    def run_name(self) -> str | None:
        """``key=value,...`` of the swept overrides, else the model's name."""
        return ",".join(f"{k}={v}" for k, v in self.swept.items()) or self.model_name


def register_job(kind: str, target: str) -> None:
    """Add a job kind: ``target`` is ``"module:function"``."""
    if ":" not in target:
        raise ValueError(f"job target must be 'module:function', got {target!r}")
    if JOB_KINDS.get(kind, target) != target:
        raise ValueError(f"job kind {kind!r} is already registered as {JOB_KINDS[kind]!r}")
    JOB_KINDS[kind] = target


def resolve_job(kind: str) -> Callable[..., dict[str, Any]]:
    """The function of job kind ``kind``; a clear error listing the known kinds otherwise."""
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind job={kind!r}; valid: {', '.join(JOB_KINDS)}")
    module, _, name = JOB_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def run_job_kind(kind: str, cfg: dict[str, Any], identity: JobIdentity) -> dict[str, Any]:
    """Run ``cfg`` with the function of ``kind``, passing the identity fields it declares."""
    fn = resolve_job(kind)
    offered = {"experiment": identity.experiment, "model_name": identity.model_name,
               "swept": dict(identity.swept), "run_name": identity.run_name}
    accepted = inspect.signature(fn).parameters
    return fn(cfg, **{k: v for k, v in offered.items() if k in accepted})
