"""PSNR and SSIM, batched in torch (CPU or GPU, float64), under two named protocols.

``pred`` and ``gt`` are float tensors ``(N, C, H, W)`` with C in {1, 3}, nominally in [0, 1].
Both functions return a float64 tensor ``(N,)``: one value per image, never a batch mean, so
per-image values can be kept for paired statistics.

Protocols (README.md, "Measurement protocols"; the record of each is :func:`protocol_record`):

``"basicsr"`` (the field's reference, ``basicsr/metrics/psnr_ssim.py``)
    clamp to [0, 1], x255, round to integers (computed in float32 like BasicSR's ``tensor2img``),
    then float64. ``crop_border`` px removed on every side. ``y_channel``: BT.601 limited-range
    luma as MATLAB ``rgb2ycbcr``, ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (R, G, B in [0, 1]),
    kept as float (BasicSR does not round Y). SSIM: Gaussian window 11x11, sigma 1.5, "valid"
    region only (no padding), ``C1 = (0.01*255)^2``, ``C2 = (0.03*255)^2``, mean of the SSIM map
    per channel, then mean over channels.

``"eamamba"`` (the EAMamba release's ``test.py``)
    no uint8 rounding: predictions clipped to [0, 1] and scored as floats (x255 for the same
    constants); SSIM additionally crops 5 px on every side of the valid SSIM map. Otherwise as
    above.

``"float"`` (the DnCNN authors' MATLAB scripts for super-resolution: ``Cal_PSNRSSIM(label*255,
    output*255, s, s)`` on single-precision Y)
    no rounding and no clipping: values scored exactly as given (x255); SSIM as ``"basicsr"``.

Grey inputs (C = 1) are scored as they are; ``y_channel`` only converts 3-channel inputs (as
BasicSR's ``to_y_channel``), and the record says ``"grey"``.

Identical images give PSNR = +inf (MSE = 0); no cap is applied, no error is raised. Means over
a set containing +inf are +inf; report per-image values or a capped mean explicitly if needed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

PROTOCOLS = ("basicsr", "eamamba", "float")

# BT.601 limited range, MATLAB rgb2ycbcr (R, G, B in [0, 1] -> Y in [16, 235]).
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0
EAMAMBA_SSIM_EXTRA_CROP = 5


def _check_inputs(pred: torch.Tensor, gt: torch.Tensor, crop_border: int, protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose one of {PROTOCOLS}")
    if not isinstance(pred, torch.Tensor) or not isinstance(gt, torch.Tensor):
        raise TypeError(f"pred and gt must be torch tensors, got {type(pred).__name__}, {type(gt).__name__}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if pred.ndim != 4 or pred.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) with C in (1, 3), got {tuple(pred.shape)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    h, w = pred.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")


def to_255(x: torch.Tensor, protocol: str) -> torch.Tensor:
    """Protocol-specific preprocessing to float64 on the 0..255 scale."""
    if protocol == "basicsr":
        # BasicSR tensor2img: float32 clamp, x255, round (half to even), then float64 for scoring.
        return (x.detach().float().clamp(0.0, 1.0) * 255.0).round().double()
    if protocol == "float":
        return x.detach().double() * 255.0
    return x.detach().double().clamp(0.0, 1.0) * 255.0


def rgb_to_y(x255: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` RGB on 0..255 -> ``(N, 1, H, W)`` BT.601 limited-range Y on 0..255."""
    r, g, b = x255[:, 0:1], x255[:, 1:2], x255[:, 2:3]
    return Y_OFFSET + (Y_WEIGHTS[0] * r + Y_WEIGHTS[1] * g + Y_WEIGHTS[2] * b) / 255.0


def prepare(pred: torch.Tensor, gt: torch.Tensor, crop_border: int, y_channel: bool, protocol: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise/clip, crop the border, convert to Y: the images the metric actually compares."""
    _check_inputs(pred, gt, crop_border, protocol)
    x, y = to_255(pred, protocol), to_255(gt, protocol)
    if crop_border:
        c = crop_border
        x, y = x[..., c:-c, c:-c], y[..., c:-c, c:-c]
    if y_channel and x.shape[1] == 3:
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y


def psnr(pred: torch.Tensor, gt: torch.Tensor, *, crop_border: int = 0, y_channel: bool = False,
         protocol: str = "basicsr") -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(255^2 / MSE)``; +inf for identical images. Shape (N,)."""
    x, y = prepare(pred, gt, crop_border, y_channel, protocol)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(PEAK**2 / mse)  # mse == 0 -> inf, no exception


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian (as OpenCV ``getGaussianKernel``), float64; its outer product with
    itself is the 2-D SSIM window."""
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """``(n - k + 1, n)`` matrix whose rows are the 1-D window ``g`` (length k) at each valid offset."""
    k = g.numel()
    m = torch.zeros(n - k + 1, n, dtype=g.dtype, device=g.device)
    for i in range(k):
        m.diagonal(i).fill_(g[i].item())
    return m


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filtering, 'valid' region only: ``(..., H, W)`` -> ``(..., H-10, W-10)``.

    Two products with banded matrices (``G_h @ X @ G_w^T``): float64 matrix products run on BLAS,
    several times faster on a CPU than float64 convolutions, with the same sums."""
    h, w = x.shape[-2:]
    return _band(h, g) @ x @ _band(w, g).T


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM map on the valid region of float64 images on 0..255, ``(N, C, H-10, W-10)``."""
    g = gaussian_window_1d(device=x.device)
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    # The five local statistics filtered in one batched product.
    mu_x, mu_y, exx, eyy, exy = _filter_valid(torch.stack([x, y, x * x, y * y, x * y]), g)
    sxx = exx - mu_x**2
    syy = eyy - mu_y**2
    sxy = exy - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return num / den


def ssim(pred: torch.Tensor, gt: torch.Tensor, *, crop_border: int = 0, y_channel: bool = False,
         protocol: str = "basicsr") -> torch.Tensor:
    """Per-image SSIM (per-channel mean of the valid SSIM map, then mean over channels). (N,)."""
    x, y = prepare(pred, gt, crop_border, y_channel, protocol)
    extra = EAMAMBA_SSIM_EXTRA_CROP if protocol == "eamamba" else 0
    h, w = x.shape[-2:]
    need = SSIM_WINDOW + 2 * extra
    if h < need or w < need:
        raise ValueError(f"SSIM ({protocol}) needs images of at least {need}x{need} after a crop of "
                         f"{crop_border} px, got {h}x{w}")
    m = ssim_map(x, y)
    if extra:
        m = m[..., extra:-extra, extra:-extra]
    # Every channel's map has the same size, so the mean over (C, H, W) is the mean of the
    # per-channel means.
    return m.mean(dim=(1, 2, 3))


def protocol_record(metric: str, *, protocol: str = "basicsr", y_channel: bool = False, crop_border: int = 0,
                    channels: int | None = None) -> dict[str, Any]:
    """The settings a PSNR/SSIM number was computed with, stored next to it."""
    if metric not in ("psnr", "ssim"):
        raise ValueError(f"protocol_record: metric must be 'psnr' or 'ssim', got {metric!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; choose one of {PROTOCOLS}")
    if channels == 1:
        space = "grey"
    elif y_channel:
        space = "Y (BT.601 limited, MATLAB rgb2ycbcr, unrounded)"
    else:
        space = "RGB"
    rec: dict[str, Any] = {
        "metric": metric,
        "protocol": protocol,
        "space": space,
        "y_channel": bool(y_channel),
        "crop_border": int(crop_border),
        "quantize": {"basicsr": "uint8 (clamp, x255, round)", "eamamba": "none (clip to [0, 1])",
                     "float": "none (no clipping)"}[protocol],
        "dtype": "float64",
        "peak": PEAK,
    }
    if metric == "psnr":
        rec["identical_images"] = "+inf"
    else:
        rec.update(window=f"gaussian {SSIM_WINDOW}x{SSIM_WINDOW} sigma={SSIM_SIGMA}", region="valid",
                   extra_crop=EAMAMBA_SSIM_EXTRA_CROP if protocol == "eamamba" else 0,
                   C1=(SSIM_K1 * PEAK) ** 2, C2=(SSIM_K2 * PEAK) ** 2, channels="per-channel mean")
    return rec


def psnr_from_mse(mse: float, peak: float = PEAK) -> float:
    """Scalar helper: PSNR for a given MSE (+inf at 0)."""
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)
