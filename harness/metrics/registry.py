"""The metric registry: name -> how to score a batch, the protocol record, direction and unit.

Like ``harness.data.DEGRADATIONS``: ``eval.metrics`` in a config names entries of ``METRICS``;
the evaluator (``harness.metrics.results``), the config check (``harness.validate``) and the
report (``harness.report``: column order, digits, higher/lower is better) read them from here.
A new metric is one ``register_metric(Metric(...))`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .fidelity import protocol_record, psnr, ssim
from .perceptual import lpips, lpips_protocol


@dataclass(frozen=True)
class Metric:
    """One image-quality metric.

    ``score(pred, gt, settings)`` returns one value per image ``(N,)``; ``protocol(settings,
    channels)`` the record stored beside the numbers. ``settings`` holds ``protocol``,
    ``crop_border``, ``y_channel`` and ``lpips_net``.
    """

    name: str
    score: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]
    protocol: Callable[[dict[str, Any], int | None], dict[str, Any]]
    higher_is_better: bool
    unit: str
    digits: int  # decimals in report tables
    label: str


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to ``METRICS`` (a name may be registered once)."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; a clear error naming the known ones otherwise."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {list(METRICS)}")
    return METRICS[name]


def _fidelity(fn: Callable) -> Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]:
    return lambda pred, gt, s: fn(pred, gt, crop_border=s["crop_border"], y_channel=s["y_channel"],
                                  protocol=s["protocol"])


def _fidelity_protocol(name: str) -> Callable[[dict[str, Any], int | None], dict[str, Any]]:
    return lambda s, channels: protocol_record(name, protocol=s["protocol"], y_channel=s["y_channel"],
                                               crop_border=s["crop_border"], channels=channels)


register_metric(Metric("psnr", _fidelity(psnr), _fidelity_protocol("psnr"), True, "dB", 2, "PSNR"))
register_metric(Metric("ssim", _fidelity(ssim), _fidelity_protocol("ssim"), True, "", 4, "SSIM"))
register_metric(Metric("lpips", lambda pred, gt, s: lpips(pred, gt, net=s["lpips_net"]),
                       lambda s, channels: lpips_protocol(s["lpips_net"]), False, "", 4, "LPIPS"))
