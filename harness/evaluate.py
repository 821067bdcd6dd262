"""Evaluation: a model over a full-image dataset, per-image metrics under a named protocol.

Images are restored one at a time at full size (reflect-padded to the model's multiple, then
cropped back; optional tiling and self-ensemble). An image whose output is not finite is
listed in ``nonfinite`` and left out of the metric values, so it can never be averaged in
silently; the runner marks such a run as failed.

The degraded input itself is scored too, under the same protocol (for super-resolution, its
bicubic upscaling): the floor every restoration model has to clear.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data import restore, write_image
from harness.metrics import MetricAccumulator


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
) -> dict[str, Any]:
    """Returns {"results": {metric: MetricResult}, "input_results": {metric: MetricResult} of the
    degraded input (when ``score_input``), "nonfinite": [names], "images": n, "time_s": s}."""
    device = torch.device(device)
    model.eval().to(device)
    settings = dict(protocol=protocol, crop_border=crop_border, y_channel=y_channel, lpips_net=lpips_net)
    acc = MetricAccumulator(tuple(metrics), **settings)
    input_acc = MetricAccumulator(tuple(metrics), **settings) if score_input else None
    nonfinite: list[str] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    t0 = time.perf_counter()
    for i in range(n):
        item = dataset[i]
        lq = item["lq"].unsqueeze(0).to(device)  # (1, C, h, w)
        gt = item["gt"].unsqueeze(0).to(device)
        out = restore(model, lq, multiple=pad_multiple, scale=scale, tile=tile, overlap=tile_overlap,
                      ensemble=ensemble).float()
        if out.shape != gt.shape:
            raise ValueError(f"model output {tuple(out.shape)} does not match the ground truth {tuple(gt.shape)} "
                             f"for image {item['name']!r} (scale {scale})")
        if input_acc is not None:
            base = lq.float() if scale == 1 else F.interpolate(lq.float(), size=gt.shape[-2:], mode="bicubic",
                                                                align_corners=False)
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
