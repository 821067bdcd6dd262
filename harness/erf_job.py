"""The ERF step of a run: maps of the run's (trained) model on embedded images, saved with ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from harness.data import EmbeddedDataset
from harness.erf import area_ratios, compute_erf, save_erf


def erf_for_run(model: torch.nn.Module, erf_cfg: Mapping[str, Any], meta: Mapping[str, Any], device: torch.device,
                run_dir: Path) -> dict[str, Any]:
    """Compute, save (.npy + heatmap) and summarise the ERF of ``model`` per ``erf_cfg``."""
    n = int(erf_cfg.get("images", 8))
    size = int(erf_cfg.get("size", 128))
    grey = int(meta.get("in_channels", 3)) == 1
    source = EmbeddedDataset("all", grey=grey)
    images = [source.load(i).gt for i in range(min(n, len(source)))]  # clean photos, (H, W, C) float
    erf_map, info = compute_erf(model, images, rectifier=erf_cfg.get("rectifier", "abs"), device=device,
                                input_size=size, return_info=True)
    thresholds = tuple(float(t) for t in erf_cfg.get("thresholds", (0.2, 0.3, 0.5, 0.99)))
    scaling = erf_cfg.get("scaling", "power0.25")
    paths = save_erf(erf_map, run_dir / "erf", meta.get("preset", "model"), scaling, info=info,
                     thresholds=thresholds)
    ratios = area_ratios(erf_map, thresholds)
    return {"area_ratios": {str(k): float(v) for k, v in ratios.items()}, "files": {k: str(v) for k, v in paths.items()},
            "info": {k: (v if not isinstance(v, (np.ndarray, torch.Tensor)) else v.tolist()) for k, v in info.items()},
            "scaling": scaling}
