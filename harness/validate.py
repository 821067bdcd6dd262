"""Configuration checks run before any heavy work; every error names the key and its value."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from harness.metrics import METRICS, PROTOCOLS
from harness.train import LOSSES, TrainSettings


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""


def _require(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate_config(cfg: Mapping[str, Any], model_meta: Mapping[str, Any] | None = None) -> None:
    """Check types, ranges and combinations of a resolved job config (plain dict)."""
    for group in ("model", "task", "data", "train", "eval", "profile", "hardware"):
        _require(isinstance(cfg.get(group), Mapping), group, cfg.get(group), "missing config group")
    _require(isinstance(cfg.get("seed"), int) and cfg["seed"] >= 0, "seed", cfg.get("seed"), "must be an int >= 0")

    train = cfg["train"]
    try:
        settings = TrainSettings.from_config(train)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train: {err}") from err
    _require(isinstance(settings.iters, int) and settings.iters >= 0, "train.iters", settings.iters, "must be >= 0")
    _require(settings.batch_size >= 1, "train.batch_size", settings.batch_size, "must be >= 1")
    _require(settings.patch_size >= 8, "train.patch_size", settings.patch_size, "must be >= 8")
    _require(settings.lr > 0, "train.lr", settings.lr, "must be > 0")
    _require(0 <= settings.ema < 1, "train.ema", settings.ema, "must be in [0, 1)")
    _require(settings.loss in LOSSES, "train.loss", settings.loss, f"valid: {sorted(LOSSES)}")
    _require(settings.schedule in ("constant", "cosine", "flat_cosine"), "train.schedule", settings.schedule,
             "valid: constant, cosine, flat_cosine")
    _require(settings.precision in ("fp32", "bf16", "fp16"), "train.precision", settings.precision,
             "valid: fp32, bf16, fp16")
    _require(settings.grad_clip is None or settings.grad_clip > 0, "train.grad_clip", settings.grad_clip,
             "must be > 0 or null")

    ev = cfg["eval"]
    _require(ev.get("protocol") in PROTOCOLS, "eval.protocol", ev.get("protocol"),
             f"valid: {', '.join(PROTOCOLS)}")
    bad = [m for m in ev.get("metrics", []) if m not in METRICS]
    _require(not bad, "eval.metrics", ev.get("metrics"), f"unknown {bad}; valid: {list(METRICS)}")
    _require(ev.get("tile") is None or int(ev["tile"]) >= 8, "eval.tile", ev.get("tile"), "must be >= 8 or null")

    device = str(cfg["hardware"].get("device", "cpu"))
    _require(device in ("cpu", "cuda", "auto") or device.startswith("cuda:"), "hardware.device", device,
             "valid: cpu, cuda, cuda:N, auto")
    if device.startswith("cuda"):
        _require(torch.cuda.is_available(), "hardware.device", device, "CUDA is not available on this machine")

    task = cfg["task"]
    scale = int(task.get("scale", 1))
    _require(scale in (1, 2, 3, 4), "task.scale", scale, "valid: 1, 2, 3, 4")
    if model_meta:
        model_scale = int(model_meta.get("scale", 1))
        # A model with meta.sr_input "bicubic" is fed the bicubic-upscaled input (VDSR/DnCNN-3 style).
        upsampled = model_scale == 1 and model_meta.get("sr_input") == "bicubic"
        _require(model_scale == scale or upsampled, "task.scale", scale,
                 f"the model ({model_meta.get('preset') or model_meta.get('family')}) upscales by {model_scale}")
        channels = 1 if task.get("grey") else 3
        in_ch = int(model_meta.get("in_channels", 3))
        # A grey model on a task scored on Y runs on the Y channel.
        luma = in_ch == 1 and bool(task.get("y_channel"))
        _require(in_ch == channels or luma, "task.grey", task.get("grey"),
                 f"the model takes {in_ch} input channels but the task gives {channels}")
        multiple = int(model_meta.get("pad_multiple", 1))
        if settings.iters > 0:
            _require(settings.patch_size % (multiple * scale) == 0, "train.patch_size", settings.patch_size,
                     f"must be a multiple of {multiple * scale} (the model's padding multiple x scale)")
