"""MATLAB's ``psnr`` and ``ssim`` as the restoration papers' MATLAB scripts call them.

The SIDD and GoPro/HIDE numbers of Restormer, EAMamba and most of their successors come from
MATLAB scripts that call ``psnr(A, ref)`` and ``ssim(A, ref)`` on whole RGB arrays. Two facts of
those functions decide the numbers:

* ``psnr`` takes one MSE over all pixels and channels, with the peak of the class (255 for
  uint8, 1 for single/double images in [0, 1]).
* ``ssim`` on an H×W×3 array treats it as a *volume* (MATLAB's default ``DataFormat`` "SSS"):
  one 11×11×11 Gaussian (σ = 1.5, the outer product of the normalised 1-D kernel) over rows,
  columns *and* channels, replicate padding on every axis, output the size of the input
  ("same"), then the mean of the whole SSIM map. This is not the per-channel SSIM averaged over
  channels that BasicSR and the EAMamba release's ``test.py`` compute.

SSIM is invariant to scaling the data and the constants together, so both functions work on
the 0..255 scale with ``C1 = (0.01·255)²``, ``C2 = (0.03·255)²`` whatever the caller's class.
Inputs are float tensors ``(N, C, H, W)`` on the 0..255 scale; outputs are float64 ``(N,)``.
MATLAB computes single-precision inputs (SIDD's ``Idenoised``) in single; these are float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fidelity import (
    PEAK,
    SSIM_K1,
    SSIM_K2,
    SSIM_SIGMA,
    SSIM_WINDOW,
    gaussian_window_1d,
)


def _check(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if pred.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) tensors, got {tuple(pred.shape)}")


def matlab_psnr(pred255: torch.Tensor, gt255: torch.Tensor) -> torch.Tensor:
    """``psnr(A, ref)``: one MSE over (C, H, W) per image, peak 255; +inf for identical images."""
    _check(pred255, gt255)
    mse = (pred255.double() - gt255.double()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(PEAK**2 / mse)


def _gauss_volume(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 3-D Gaussian over (C, H, W) of ``(N, C, H, W)``, replicate padding, same size."""
    r = (g.numel() - 1) // 2
    v = F.pad(x.unsqueeze(1), (r, r, r, r, r, r), mode="replicate")  # (N, 1, C+2r, H+2r, W+2r)
    v = F.conv3d(v, g.view(1, 1, -1, 1, 1))
    v = F.conv3d(v, g.view(1, 1, 1, -1, 1))
    v = F.conv3d(v, g.view(1, 1, 1, 1, -1))
    return v.squeeze(1)  # (N, C, H, W)


def matlab_ssim(pred255: torch.Tensor, gt255: torch.Tensor) -> torch.Tensor:
    """``ssim(A, ref)`` with MATLAB's defaults: volumetric over (C, H, W) (see the module doc)."""
    _check(pred255, gt255)
    x, y = pred255.double(), gt255.double()
    g = gaussian_window_1d(SSIM_WINDOW, SSIM_SIGMA, device=x.device)
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    mu_x, mu_y = _gauss_volume(x, g), _gauss_volume(y, g)
    sxx = _gauss_volume(x * x, g) - mu_x**2
    syy = _gauss_volume(y * y, g) - mu_y**2
    sxy = _gauss_volume(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2, 3))
