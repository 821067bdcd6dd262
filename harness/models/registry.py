"""Model presets: one YAML file per preset in ``conf/model/``, built by name.

A preset file holds ``_target_`` (the class), its constructor arguments, and a ``meta`` block
(family, input range, padding multiple, scale, official parameter/FLOP figures) that
describes the preset without being passed to the constructor. The same files are the
``model`` config group of ``run.py``, so a preset means the same thing from Python and from
the command line.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

# conf/ sits at the repository root, beside the harness package (editable installs).
CONF_DIR = Path(os.environ.get("EABENCH_CONF", Path(__file__).resolve().parents[2] / "conf"))
MODEL_DIR = CONF_DIR / "model"


def available() -> list[str]:
    """Names of all model presets (files in conf/model/ without .yaml), sorted."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def preset_config(name: str) -> DictConfig:
    """The preset's config as written in its file; errors list the valid names."""
    path = MODEL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; available presets: {available()}")
    return OmegaConf.load(path)


def preset_meta(name: str) -> dict[str, Any]:
    """The preset's metadata (family, input_range, pad_multiple, scale, official figures)."""
    return OmegaConf.to_container(preset_config(name).get("meta", {}), resolve=True)


def _import(target: str):
    module, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def build(cfg: Mapping | DictConfig, **overrides) -> nn.Module:
    """Instantiate a model config (``_target_`` + arguments + optional ``meta``).

    ``overrides`` replace constructor arguments; a name the constructor does not take is an
    error that lists the ones it does. The model gets ``eabench_meta`` (the meta block).
    """
    spec = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    spec = dict(spec)
    meta = dict(spec.pop("meta", None) or {})
    target = spec.pop("_target_", None)
    if target is None:
        raise ValueError("model config has no _target_ (the class to build)")
    cls = _import(target)
    params = inspect.signature(cls).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in overrides:
        if key not in params and not takes_kwargs:
            raise ValueError(
                f"{cls.__name__} has no option {key!r}; valid options: {sorted(params)}"
            )
    spec.update(overrides)
    model = cls(**spec)
    model.eabench_meta = meta
    return model


def create(name: str, **overrides) -> nn.Module:
    """Build preset ``name`` (a file in conf/model/) with constructor ``overrides``."""
    model = build(preset_config(name), **overrides)
    model.eabench_meta["preset"] = name
    return model


def model_in_channels(model: nn.Module) -> int:
    """Channels a model takes: its preset meta ``in_channels``, else its first Conv2d's, else 3."""
    meta = getattr(model, "eabench_meta", None) or {}
    if meta.get("in_channels"):
        return int(meta["in_channels"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3
