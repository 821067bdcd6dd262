"""The EAMamba release's evaluation protocols: which weights, which forward, which scoring.

Three routes produce the numbers in the release's README, and each cell of
``experiment=paper_eamamba`` names one:

``testpy``  (``test.py``; Gaussian denoising, RealSR, SOTS, DPDD)
    the EMA weights (``model/sd_e``); the LQ padded to a multiple of 8 by the dataset; the whole
    image in one forward, or for RealSR (``eval_crop_size: 2048``) the release's four overlapping
    quadrants (:func:`forward_quadrants`); the output cropped to the GT and clipped to [0, 1];
    float scoring without rounding: PSNR on RGB or Y (RealSR ``eval_y_only``), no border crop
    (``test.py`` crops ``scale`` px only for its classic-SR dataset keys), per-channel SSIM on the
    valid region with a further 5-px crop -- the harness's ``protocol="eamamba"``.
``matlab_single``  (``task_evaluation/gen_sidd_mat.py`` + ``evaluate_SIDD.m``; SIDD)
    the *non-EMA* weights (``model/sd``: the script keeps the first model ``models.make``
    returns); each 256² block in one forward; the output clipped, kept as float32; MATLAB
    ``psnr``/``ssim`` against ``im2single`` of the GT blocks (:mod:`harness.metrics.matlab`).
``matlab_uint8``  (``task_evaluation/gen_deblur_png.py`` + ``evaluate_gopro_hide.m``; GoPro, HIDE)
    the EMA weights; reflect padding to a multiple of 8; the output clipped and written as
    8-bit PNG (``img_as_ubyte``: float32 ×255, round half to even); MATLAB ``psnr``/``ssim`` of
    the uint8 images.

Every route averages per-image values (batch 1, no self-ensemble).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.checkpoints import CheckpointError, compare_state_dicts, read_checkpoint
from harness.metrics import protocol_record, psnr, ssim
from harness.metrics.matlab import matlab_psnr, matlab_ssim

ROUTES = ("testpy", "matlab_single", "matlab_uint8")
WEIGHT_KEYS = ("sd_e", "sd")
QUADRANT_SHAVE = 16


def load_release_weights(model: nn.Module, path: str | Path, key: str = "sd_e") -> dict[str, Any]:
    """Load ``{"model": {"sd", "sd_e", ...}}``'s ``key`` into ``model`` strictly.

    The release's own loader (``models.make(spec, load_sd=True)``) loads both state dicts
    strictly; a route picks one. Returns what was loaded and the container's other entries.
    """
    if key not in WEIGHT_KEYS:
        raise ValueError(f"weights key must be one of {WEIGHT_KEYS}, got {key!r}")
    container = read_checkpoint(path)
    spec = container.get("model") if isinstance(container, Mapping) else None
    if not isinstance(spec, Mapping) or key not in spec:
        found = sorted(spec) if isinstance(spec, Mapping) else (sorted(container) if isinstance(container, Mapping)
                                                                else type(container).__name__)
        raise CheckpointError(f"{path} is not an EAMamba release checkpoint with model/{key} (found {found})")
    state = spec[key]
    diff = compare_state_dicts(model.state_dict(), state)
    if any(diff.values()):
        shown = {k: v[:5] for k, v in diff.items() if v}
        raise CheckpointError(f"{path} (model/{key}, release model {spec.get('name')!r}) does not fit "
                              f"{type(model).__name__}: {shown}")
    model.load_state_dict(state, strict=True)
    return {"path": str(path), "key": f"model/{key}", "release_model": spec.get("name"),
            "release_args": spec.get("args"), "current_iter": container.get("current_iter"), **diff}


def forward_quadrants(model: nn.Module, x: torch.Tensor, shave: int = QUADRANT_SHAVE, crop_size: int = 2048,
                      scale: int = 1) -> torch.Tensor:
    """``test.py``'s ``forward_patch``: four overlapping quadrants, each cut to a multiple of 8.

    The quadrants of an input below ``crop_size²`` pixels go through the model; an input of that
    size or more has each of its quadrants split the same way (the release's recursive call keeps
    ``scale = 1``). The output takes each quadrant's own corner.
    """
    b, c, h, w = x.shape
    hh, hw = h // 2, w // 2
    top = slice(0, hh + shave - hh % 8)
    bottom = slice(h - (h - hh) - shave + (h - hh) % 8, h)
    left = slice(0, hw + shave - hw % 8)
    right = slice(w - (w - hw) - shave + (w - hw) % 8, w)
    chops = [x[..., top, left], x[..., top, right], x[..., bottom, left], x[..., bottom, right]]
    if h * w < crop_size * crop_size:
        outs = [model(chop) for chop in chops]
    else:
        outs = [forward_quadrants(model, chop, shave=shave, crop_size=crop_size) for chop in chops]
    H, W = h * scale, w * scale
    y = x.new_empty(b, c, H, W)
    top, bottom, bottom_r = slice(0, H // 2), slice(H - H // 2, H), slice(H // 2 - H, None)
    left, right, right_r = slice(0, W // 2), slice(W - W // 2, W), slice(W // 2 - W, None)
    y[..., top, left] = outs[0][..., top, left]
    y[..., top, right] = outs[1][..., top, right_r]
    y[..., bottom, left] = outs[2][..., bottom_r, left]
    y[..., bottom, right] = outs[3][..., bottom_r, right_r]
    return y


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """``img_as_ubyte`` of a float32 image in [0, 1]: ×255 in float32, round half to even (0..255)."""
    return (x.float().clamp(0, 1) * 255.0).round()


def score(route: str, pred: torch.Tensor, gt: torch.Tensor, y_channel: bool = False) -> dict[str, float]:
    """PSNR and SSIM of one image ``(1, C, H, W)`` under ``route``; ``pred`` is the cropped output."""
    pred = pred.clamp(0, 1)
    if route == "testpy":
        return {"psnr": float(psnr(pred, gt, y_channel=y_channel, protocol="eamamba")[0]),
                "ssim": float(ssim(pred, gt, y_channel=y_channel, protocol="eamamba")[0])}
    if y_channel:
        raise ValueError(f"route {route!r} scores RGB only")
    gt255 = (gt.double() * 255.0).round()  # the GT is 8-bit data (uint8 PNG, or SIDD's uint8 blocks)
    if route == "matlab_single":
        p255 = pred.float().double() * 255.0
    elif route == "matlab_uint8":
        p255 = to_uint8_levels(pred).double()
    else:
        raise ValueError(f"unknown route {route!r}; choose one of {ROUTES}")
    return {"psnr": float(matlab_psnr(p255, gt255)[0]), "ssim": float(matlab_ssim(p255, gt255)[0])}


def route_protocol(route: str, y_channel: bool = False) -> dict[str, Any]:
    """The record stored beside each number: scoring, weights and forward of the route."""
    if route == "testpy":
        return {"route": route, "weights": "model/sd_e", "script": "test.py",
                "psnr": protocol_record("psnr", protocol="eamamba", y_channel=y_channel),
                "ssim": protocol_record("ssim", protocol="eamamba", y_channel=y_channel)}
    quant = "float32 output, clipped" if route == "matlab_single" else "8-bit PNG (img_as_ubyte)"
    return {"route": route, "weights": "model/sd" if route == "matlab_single" else "model/sd_e",
            "script": "gen_sidd_mat.py + evaluate_SIDD.m" if route == "matlab_single"
            else "gen_deblur_png.py + evaluate_gopro_hide.m",
            "psnr": {"metric": "psnr", "protocol": "matlab", "space": "RGB", "quantize": quant, "peak": 255.0},
            "ssim": {"metric": "ssim", "protocol": "matlab", "space": "RGB volume (11x11x11 Gaussian over H, W and "
                     "channels, replicate padding, same size)", "quantize": quant}}


@torch.no_grad()
def evaluate_release(model: nn.Module, dataset, route: str, *, y_channel: bool = False, forward: str = "whole",
                     crop_size: int = 2048, device: torch.device | str = "cpu", limit: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Per-image PSNR/SSIM of ``model`` on a :class:`~harness.data.release_sets.ReleaseTestSet`."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose one of {ROUTES}")
    if forward not in ("whole", "quadrants"):
        raise ValueError(f"forward must be 'whole' or 'quadrants', got {forward!r}")
    device = torch.device(device)
    model.eval().to(device)
    names, psnrs, ssims, nonfinite = [], [], [], []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    t0 = time.perf_counter()
    for i in range(n):
        item = dataset[i]
        lq = item["lq"].unsqueeze(0).to(device)  # (1, 3, H8, W8)
        gt = item["gt"].unsqueeze(0).to(device)  # (1, 3, H, W)
        out = model(lq) if forward == "whole" else forward_quadrants(model, lq, crop_size=crop_size)
        out = out[..., : gt.shape[-2], : gt.shape[-1]].float()
        if out.shape != gt.shape:
            raise ValueError(f"output {tuple(out.shape)} does not cover the target {tuple(gt.shape)} of {item['name']!r}")
        if not torch.isfinite(out).all():
            nonfinite.append(item["name"])
            continue
        s = score(route, out, gt, y_channel)
        names.append(item["name"])
        psnrs.append(s["psnr"])
        ssims.append(s["ssim"])
        if progress is not None:
            progress(i + 1, n)
    return {"names": names, "psnr": psnrs, "ssim": ssims, "nonfinite": nonfinite, "images": n,
            "time_s": time.perf_counter() - t0}
