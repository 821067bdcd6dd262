"""Plain float64 numpy PSNR/SSIM, one image at a time, written straight from the definitions.

This is the cross-check for the batched torch implementation in :mod:`.fidelity` (tests compare
the two), and a readable statement of what the protocols compute. It is deliberately written
differently: loops over images and channels, an explicit 2-D 11x11 window applied by a sliding
view (no separable convolution, no torch).

Inputs are numpy arrays ``(H, W, C)`` (or ``(H, W)``) with values nominally in [0, 1].
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def preprocess(img: np.ndarray, protocol: str) -> np.ndarray:
    """To float64 0..255: ``basicsr`` rounds to integers (float32 arithmetic, as BasicSR's
    ``tensor2img``), ``eamamba`` only clips."""
    if protocol == "basicsr":
        q = np.round(np.clip(img.astype(np.float32), np.float32(0), np.float32(1)) * np.float32(255))
        return q.astype(np.float64)
    if protocol == "eamamba":
        return np.clip(img.astype(np.float64), 0.0, 1.0) * 255.0
    raise ValueError(f"unknown protocol {protocol!r}")


def y_channel_255(img255: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma of a 0..255 RGB image: 16 + (65.481 R + 128.553 G + 24.966 B)/255."""
    r, g, b = img255[..., 0], img255[..., 1], img255[..., 2]
    return (16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0)[..., None]


def _prepare(pred, gt, crop_border, y_channel, protocol):
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim == 2:
        pred, gt = pred[..., None], gt[..., None]
    if pred.shape != gt.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {gt.shape}")
    x, y = preprocess(pred, protocol), preprocess(gt, protocol)
    if crop_border > 0:
        c = crop_border
        x, y = x[c:-c, c:-c], y[c:-c, c:-c]
    if y_channel and x.shape[2] == 3:
        x, y = y_channel_255(x), y_channel_255(y)
    return x, y


def psnr_np(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = False,
            protocol: str = "basicsr") -> float:
    x, y = _prepare(pred, gt, crop_border, y_channel, protocol)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * np.log10(255.0 * 255.0 / mse)


def gaussian_window_2d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    xx, yy = np.meshgrid(ax, ax, indexing="ij")
    w = np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
    return w / w.sum()


def ssim_single_channel(x: np.ndarray, y: np.ndarray, extra_crop: int = 0) -> float:
    """SSIM of two 2-D float64 images on 0..255: mean of the valid-region SSIM map."""
    w = gaussian_window_2d()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    px = sliding_window_view(x, w.shape)  # (H-10, W-10, 11, 11): every window, no padding
    py = sliding_window_view(y, w.shape)
    mu_x = np.einsum("ijkl,kl->ij", px, w)
    mu_y = np.einsum("ijkl,kl->ij", py, w)
    var_x = np.einsum("ijkl,kl->ij", px * px, w) - mu_x**2
    var_y = np.einsum("ijkl,kl->ij", py * py, w) - mu_y**2
    cov = np.einsum("ijkl,kl->ij", px * py, w) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    if extra_crop:
        smap = smap[extra_crop:-extra_crop, extra_crop:-extra_crop]
    return float(smap.mean())


def ssim_np(pred: np.ndarray, gt: np.ndarray, crop_border: int = 0, y_channel: bool = False,
            protocol: str = "basicsr") -> float:
    x, y = _prepare(pred, gt, crop_border, y_channel, protocol)
    extra = 5 if protocol == "eamamba" else 0
    vals = [ssim_single_channel(x[:, :, c], y[:, :, c], extra) for c in range(x.shape[2])]
    return float(np.mean(vals))
