"""Evaluation: a model over a full-image dataset, per-image metrics under a named protocol.

Images are restored one at a time at full size (reflect-padded to the model's multiple, then
cropped back; optional tiling and self-ensemble). An image whose output is not finite is
listed in ``nonfinite`` and left out of the metric values, so it can never be averaged in
silently; the runner marks such a run as failed.

The degraded input itself is scored too, under the same protocol (for super-resolution, its
bicubic upscaling): the floor every restoration model has to clear.

How a model is fed follows its preset meta, as the authors' test scripts feed it:

* ``sr_input: bicubic`` (a scale-1 model on an SR task, VDSR/DnCNN-3 style): the LR image is
  upscaled with MATLAB bicubic (float, unclipped, :func:`harness.data.imresize`) to the ground
  truth's size and the model restores that;
* a one-channel model on three-channel images runs on the Y channel (MATLAB ``rgb2ycbcr``,
  float): input and ground truth are converted, and the Y images are scored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data import imresize, restore, write_image
from harness.metrics import MetricAccumulator, rgb_to_y
from harness.models.registry import model_in_channels


def bicubic_upscale(lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """MATLAB ``imresize(lq, size, 'bicubic')`` of an ``(N, C, h, w)`` batch, float, unclipped."""
    arr = lq.detach().cpu().double().permute(0, 2, 3, 1).numpy()
    scale = size[0] / lq.shape[-2]
    out = [imresize(a, scale, out_size=tuple(size)) for a in arr]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(lq.device, torch.float32)


def luma(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB in [0, 1] -> ``(N, 1, H, W)`` MATLAB ``rgb2ycbcr`` Y in [0, 1], float."""
    return (rgb_to_y(x.double() * 255.0) / 255.0).to(x.dtype)


def feed(model: nn.Module, lq: torch.Tensor, gt: torch.Tensor, scale: int
         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(model input, ground truth to score against, the model's own scale) as the preset says."""
    meta = getattr(model, "eabench_meta", None) or {}
    if scale > 1 and meta.get("sr_input") == "bicubic":
        lq, scale = bicubic_upscale(lq, tuple(gt.shape[-2:])), 1
    if model_in_channels(model) == 1 and gt.shape[1] == 3:
        lq, gt = luma(lq), luma(gt)
    return lq, gt, scale


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    metrics: Sequence[str] = ("psnr", "ssim"),
    protocol: str = "basicsr",
    crop_border: int = 0,
    y_channel: bool = False,
    lpips_net: str = "alex",
    pad_multiple: int = 1,
    scale: int = 1,
    tile: int | None = None,
    tile_overlap: int = 32,
    ensemble: str | None = None,
    device: torch.device | str = "cpu",
    save_dir: str | Path | None = None,
    limit: int | None = None,
    score_input: bool = True,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Returns {"results": {metric: MetricResult}, "input_results": {metric: MetricResult} of the
    degraded input (when ``score_input``), "nonfinite": [names], "images": n, "time_s": s}.

    ``channels_last`` runs the model and its inputs in NHWC memory (the preset's ``meta.channels_last``):
    oneDNN's and cuDNN's convolutions are faster there, so plain convolution stacks (DnCNN, FFDNet)
    gain about 1.8x on a CPU; the values are the same convolutions.
    """
    device = torch.device(device)
    model.eval().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=memory_format)
    settings = dict(protocol=protocol, crop_border=crop_border, y_channel=y_channel, lpips_net=lpips_net)
    acc = MetricAccumulator(tuple(metrics), **settings)
    input_acc = MetricAccumulator(tuple(metrics), **settings) if score_input else None
    nonfinite: list[str] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    t0 = time.perf_counter()
    for i in range(n):
        item = dataset[i]
        lq, gt, model_scale = feed(model, item["lq"].unsqueeze(0), item["gt"].unsqueeze(0), scale)
        lq, gt = lq.to(device).contiguous(memory_format=memory_format), gt.to(device)  # (1, C, h, w), (1, C, H, W)
        out = restore(model, lq, multiple=pad_multiple, scale=model_scale, tile=tile, overlap=tile_overlap,
                      ensemble=ensemble).float()
        if out.shape != gt.shape:
            raise ValueError(f"model output {tuple(out.shape)} does not match the ground truth {tuple(gt.shape)} "
                             f"for image {item['name']!r} (scale {scale})")
        if input_acc is not None:
            base = lq.float() if model_scale == 1 else F.interpolate(lq.float(), size=gt.shape[-2:],
                                                                      mode="bicubic", align_corners=False)
            input_acc.update(base.clamp(0, 1), gt, [item["name"]])
        if not torch.isfinite(out).all():
            nonfinite.append(item["name"])
            continue
        acc.update(out.clamp(0, 1), gt, [item["name"]])
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            write_image(Path(save_dir) / f"{item['name']}.png", out[0].clamp(0, 1).cpu())
    return {"results": acc.results(), "input_results": input_acc.results() if input_acc is not None else {},
            "nonfinite": nonfinite, "images": n, "time_s": time.perf_counter() - t0}


def summarise(results: Mapping[str, Any]) -> dict[str, dict]:
    """JSON-able per-metric summary: mean, per-image values and names, protocol."""
    return {m: {"mean": r.mean, "values": r.values, "names": r.names, "protocol": r.protocol}
            for m, r in results.items()}
