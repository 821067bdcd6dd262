"""MATLAB ``imresize`` (bicubic, antialiased) in numpy float64.

Classic SR benchmarks (Set5, Set14, B100, Urban100, Manga109, DIV2K) make their LR images with
MATLAB ``imresize(hr, 1/scale, 'bicubic')``. PIL, OpenCV and ``torch.nn.functional.interpolate``
all differ from it (no antialias, other kernels, other padding), which shifts PSNR by tenths of a
dB. This module follows MATLAB's definition (``imresize.m``: ``contributions`` and ``cubic``):

* cubic convolution kernel with a = -0.5 (Keys), support width 4;
* when shrinking (scale < 1) with antialiasing, the kernel is stretched: ``h(x) = s * k(s * x)``
  and its width becomes ``4 / s`` input pixels;
* output pixel ``x`` (1-based) maps to input coordinate ``u = x / s + 0.5 * (1 - 1 / s)``;
  contributing input pixels are ``floor(u - width / 2) + (0 .. ceil(width) + 1)``;
  weights are normalised to sum to 1 (so constants stay constant);
* out-of-range indices are mirrored symmetrically (``d c b a | a b c d | d c b a``), which is
  MATLAB's ``aux = [1:n, n:-1:1]`` indexing;
* output size is ``ceil(s * n)``; dimensions are resized one at a time, the one with the smaller
  scale first (rows first when equal), as MATLAB does.

MATLAB on uint8 input rounds the result back to uint8; :func:`imresize` returns float and the
caller decides (the ``bicubic_down`` degradation quantises to 8-bit by default and records it).
"""

from __future__ import annotations

import math

import numpy as np


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def contributions(in_length: int, out_length: int, scale: float, antialiasing: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weights and (0-based, mirrored) input indices for one dimension, as MATLAB computes them.

    Returns ``(weights, indices)``, both ``(out_length, P)``; output ``i`` is
    ``sum_j weights[i, j] * input[indices[i, j]]``.
    """
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        # Stretch the kernel so it low-passes before decimation (the antialiasing filter).
        def h(x):
            return scale * cubic(scale * x)
        kernel_width = kernel_width / scale
    else:
        h = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    p = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(p, dtype=np.float64)[None, :]  # 1-based, may be out of range
    weights = h(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Symmetric mirror of out-of-range indices: aux = [1..n, n..1], index = aux[mod(i - 1, 2n)].
    aux = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    idx0 = aux[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    # MATLAB drops columns whose weights are all zero.
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], idx0[:, keep]


def resize_matrix(in_length: int, out_length: int, scale: float, antialiasing: bool = True) -> np.ndarray:
    """Dense ``(out_length, in_length)`` matrix applying MATLAB's 1-D resize (float64)."""
    weights, indices = contributions(in_length, out_length, scale, antialiasing)
    m = np.zeros((out_length, in_length), dtype=np.float64)
    rows = np.repeat(np.arange(out_length), weights.shape[1])
    np.add.at(m, (rows, indices.ravel()), weights.ravel())  # mirrored taps may hit one pixel twice
    return m


def output_size(in_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """MATLAB's output size: ``ceil(scale * n)`` per dimension."""
    # Round first so e.g. 3 * (1/3) * 99 is not pushed to 34 by float error.
    return tuple(int(math.ceil(round(scale * n, 10))) for n in in_size)  # type: ignore[return-value]


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True,
             out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize ``(H, W)`` or ``(H, W, C)`` by ``scale`` with MATLAB bicubic semantics.

    Computed in float64; returns float64 (no clipping, no rounding: bicubic overshoots slightly
    outside [0, 1] near edges, as MATLAB's double output does).
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    arr = np.asarray(img, dtype=np.float64)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    oh, ow = out_size if out_size is not None else output_size((h, w), scale)
    scales = (oh / h, ow / w) if out_size is not None else (scale, scale)
    # MATLAB: resize along the dimension with the smaller scale first (stable: rows on ties).
    order = sorted(range(2), key=lambda d: scales[d])
    for dim in order:
        n_in = arr.shape[dim]
        n_out = (oh, ow)[dim]
        m = resize_matrix(n_in, n_out, scales[dim], antialiasing)
        if dim == 0:
            arr = np.einsum("oh,hwc->owc", m, arr)
        else:
            arr = np.einsum("ow,hwc->hoc", m, arr)
    return arr[:, :, 0] if squeeze else arr


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop ``(H, W[, C])`` at the bottom/right so H and W are multiples of ``scale``."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale, ...]
