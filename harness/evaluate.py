"""Evaluation: a model over a full-image dataset, per-image metrics under a named protocol.

Images are restored one at a time at full size (reflect-padded to the model's multiple, then
cropped back; optional tiling and self-ensemble). An image whose output is not finite is
listed in ``nonfinite`` and left out of the metric values, so it can never be averaged in
silently; the runner marks such a run as failed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

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
) -> dict[str, Any]:
    """Returns {"results": {metric: MetricResult}, "nonfinite": [names], "images": n, "time_s": s}."""
    device = torch.device(device)
    model.eval().to(device)
    acc = MetricAccumulator(tuple(metrics), protocol=protocol, crop_border=crop_border, y_channel=y_channel,
                            lpips_net=lpips_net)
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
        if not torch.isfinite(out).all():
            nonfinite.append(item["name"])
            continue
        acc.update(out.clamp(0, 1), gt, [item["name"]])
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            write_image(Path(save_dir) / f"{item['name']}.png", out[0].clamp(0, 1).cpu())
    return {"results": acc.results(), "nonfinite": nonfinite, "images": n, "time_s": time.perf_counter() - t0}


def summarise(results: Mapping[str, Any]) -> dict[str, dict]:
    """JSON-able per-metric summary: mean, per-image values and names, protocol."""
    return {m: {"mean": r.mean, "values": r.values, "names": r.names, "protocol": r.protocol}
            for m, r in results.items()}
