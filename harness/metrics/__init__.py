"""Image-quality metrics whose every number carries the protocol that produced it.

* :func:`psnr`, :func:`ssim` (:mod:`.fidelity`) -- ``(pred, gt, *, crop_border=0, y_channel=False,
  protocol="basicsr"|"eamamba")`` on ``(N, C, H, W)`` tensors in [0, 1], float64, CPU or GPU,
  returning ``(N,)``. :mod:`.reference` holds the float64 numpy versions they are tested against.
* :func:`lpips` (:mod:`.perceptual`) -- ``(pred, gt, *, net="alex"|"vgg")``, v0.1 heads, ImageNet
  backbone fetched offline-safely (:mod:`.lpips_weights`), ``(N,)``.
* :data:`METRICS` (:mod:`.registry`) -- the registry: name -> :class:`Metric` (score function,
  protocol record, direction, unit); :func:`register_metric` adds one.
* :class:`MetricResult`, :func:`evaluate_pair_batch`, :class:`MetricAccumulator` (:mod:`.results`) --
  per-image values with their protocol record.
"""

from .fidelity import PROTOCOLS, protocol_record, psnr, rgb_to_y, ssim
from .lpips_weights import WeightsUnavailable, backbone_state_dict
from .perceptual import get_lpips_model, lpips, lpips_protocol
from .registry import METRICS, Metric, get_metric, register_metric
from .results import MetricAccumulator, MetricResult, evaluate_pair_batch, metric_protocol

__all__ = [
    "psnr", "ssim", "lpips", "rgb_to_y", "PROTOCOLS", "protocol_record", "lpips_protocol", "metric_protocol",
    "MetricResult", "MetricAccumulator", "evaluate_pair_batch", "METRICS", "Metric", "get_metric", "register_metric",
    "get_lpips_model", "backbone_state_dict", "WeightsUnavailable",
]
