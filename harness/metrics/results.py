"""Metric results that carry their protocol and keep per-image values.

* :class:`MetricResult` -- one metric over a set of images: ``values`` (per image, in order),
  ``names`` (image names), ``protocol`` (dict: metric, protocol name, RGB/Y/grey, crop, LPIPS net
  and version, ...). ``mean`` is the plain mean of ``values`` (+inf if any PSNR is +inf).
* :func:`evaluate_pair_batch` -- score one batch with several metrics, returns
  ``{metric: MetricResult}``.
* :class:`MetricAccumulator` -- fixed settings, ``update()`` per batch, ``results()`` at the end.

Example::

    acc = MetricAccumulator(("psnr", "ssim", "lpips"), protocol="basicsr", y_channel=True, crop_border=4)
    for batch in loader:
        acc.update(restore(model, batch["lq"]), batch["gt"], batch["name"])
    res = acc.results()          # {"psnr": MetricResult(...), ...}
    res["psnr"].mean, res["psnr"].values, res["psnr"].protocol
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .registry import METRICS, get_metric


@dataclass
class MetricResult:
    """Per-image values of one metric plus the protocol that produced them."""

    metric: str
    protocol: dict[str, Any]
    values: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / len(self.values) if self.values else float("nan")

    def __len__(self) -> int:
        return len(self.values)

    def extend(self, values: Iterable[float], names: Iterable[str]) -> None:
        values, names = [float(v) for v in values], list(names)
        if len(values) != len(names):
            raise ValueError(f"{self.metric}: {len(values)} values but {len(names)} names")
        self.values.extend(values)
        self.names.extend(names)

    def as_dict(self) -> dict[str, str | float]:
        """name -> value."""
        return dict(zip(self.names, self.values))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (+inf is written as the float inf; json.dumps emits ``Infinity``)."""
        return {"metric": self.metric, "mean": self.mean, "n": len(self.values), "protocol": dict(self.protocol),
                "per_image": [{"name": n, "value": v} for n, v in zip(self.names, self.values)]}


def metric_protocol(metric: str, *, protocol: str = "basicsr", crop_border: int = 0, y_channel: bool = False,
                    lpips_net: str = "alex", channels: int | None = None) -> dict[str, Any]:
    """Protocol record for ``metric`` under the given settings."""
    settings = dict(protocol=protocol, crop_border=crop_border, y_channel=y_channel, lpips_net=lpips_net)
    return get_metric(metric).protocol(settings, channels)


def evaluate_pair_batch(pred: torch.Tensor, gt: torch.Tensor, *, metrics: Sequence[str] = ("psnr", "ssim"),
                        protocol: str = "basicsr", crop_border: int = 0, y_channel: bool = False,
                        lpips_net: str = "alex", names: Sequence[str] | None = None) -> dict[str, MetricResult]:
    """Score a batch ``(N, C, H, W)`` with each metric; per-image values, protocol attached."""
    if pred.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) tensors, got {tuple(pred.shape)}")
    n = pred.shape[0]
    names = [str(i) for i in range(n)] if names is None else [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for a batch of {n}")
    out = {}
    settings = dict(protocol=protocol, crop_border=crop_border, y_channel=y_channel, lpips_net=lpips_net)
    for m in metrics:
        metric = get_metric(m)
        vals = metric.score(pred, gt, settings)
        rec = metric.protocol(settings, pred.shape[1])
        out[m] = MetricResult(metric=m, protocol=rec)
        out[m].extend(vals.tolist(), names)
    return out


class MetricAccumulator:
    """Collect per-image metric values over many batches under one fixed protocol."""

    def __init__(self, metrics: Sequence[str] = ("psnr", "ssim"), *, protocol: str = "basicsr",
                 crop_border: int = 0, y_channel: bool = False, lpips_net: str = "alex") -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
        self.metrics = tuple(metrics)
        self.settings = dict(protocol=protocol, crop_border=crop_border, y_channel=y_channel, lpips_net=lpips_net)
        self._results: dict[str, MetricResult] = {}

    def update(self, pred: torch.Tensor, gt: torch.Tensor, names: Sequence[str] | None = None
               ) -> dict[str, MetricResult]:
        """Score a batch, append its per-image values, and return the batch's own results."""
        if names is None:
            start = len(next(iter(self._results.values()))) if self._results else 0
            names = [str(start + i) for i in range(pred.shape[0])]
        batch = evaluate_pair_batch(pred, gt, metrics=self.metrics, names=names, **self.settings)
        for m, r in batch.items():
            if m not in self._results:
                self._results[m] = MetricResult(metric=m, protocol=r.protocol)
            elif self._results[m].protocol != r.protocol:
                raise ValueError(f"{m}: protocol changed between batches ({self._results[m].protocol} -> "
                                 f"{r.protocol}); e.g. grey and RGB images mixed in one accumulator")
            self._results[m].extend(r.values, r.names)
        return batch

    def results(self) -> dict[str, MetricResult]:
        return dict(self._results)

    def summary(self) -> dict[str, float]:
        """metric -> mean over all images seen."""
        return {m: r.mean for m, r in self._results.items()}
