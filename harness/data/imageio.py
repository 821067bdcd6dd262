"""Image reading/writing and array <-> tensor conversion.

Conventions used everywhere in ``harness.data``:

* In numpy, an image is ``float32`` of shape ``(H, W, C)`` with ``C`` in {1, 3}, values in
  [0, 1] for clean images (degraded images may leave that range: Gaussian noise is unclipped).
* In torch, an image is ``(C, H, W)`` (a batch ``(N, C, H, W)``).
* 8-bit files are divided by 255, 16-bit files by 65535. Alpha channels are dropped; palette,
  CMYK and other modes are converted to RGB by Pillow; grey files stay single-channel.

Every failure names the file: a benchmark run over a folder of 100 images must say *which*
image is broken.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# MATLAB rgb2gray weights (the BT.601 luma weights as MATLAB rounds them). Grey benchmark sets
# (Set12, BSD68) were made this way, so our grey variants follow it.
GREY_WEIGHTS = (0.298936021293775, 0.587043074451121, 0.114020904255103)


class ImageReadError(OSError):
    """An image file is missing, unreadable or has an unsupported layout. The message names it."""


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files directly inside ``folder`` (not recursive).

    Raises ``FileNotFoundError`` naming the folder if it does not exist, and ``ValueError`` if it
    holds no image with one of :data:`IMAGE_EXTENSIONS`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
    return files


def read_image(path: str | os.PathLike, channels: str | None = None) -> np.ndarray:
    """Read an image file as float32 ``(H, W, C)`` in [0, 1].

    Args:
        path: image file.
        channels: ``None`` keeps the file's own channel count (1 or 3); ``"rgb"`` converts grey
            to RGB by replication; ``"grey"`` converts RGB to grey with MATLAB ``rgb2gray``
            weights (no rounding); ``"y"`` to the 8-bit luma of MATLAB ``rgb2ycbcr``.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow ships with torchvision/matplotlib

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # force decoding now so truncated files fail here, naming the file
            arr = _pil_to_array(im, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    return convert_channels(arr, channels, source=str(path))


def _pil_to_array(im, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        # 32-bit integer mode: Pillow uses it for 16-bit PNGs on some versions.
        raw = np.asarray(im)
        if raw.max(initial=0) > 65535 or raw.min(initial=0) < 0:
            raise ImageReadError(f"unsupported 32-bit integer image {path} (values outside 0..65535)")
        arr = raw.astype(np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
    elif mode in ("L", "1"):
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    elif mode == "LA":
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    else:  # RGB, RGBA, P, CMYK, YCbCr, ... -> RGB (alpha dropped)
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ImageReadError(f"unsupported image layout {arr.shape} in {path}")
    return np.ascontiguousarray(arr)


def convert_channels(arr: np.ndarray, channels: str | None, source: str = "image") -> np.ndarray:
    """Convert an ``(H, W, C)`` array to ``channels`` ("rgb", "grey"/"gray" or None = keep)."""
    if channels is None:
        return arr
    c = channels.lower()
    if c == "rgb":
        if arr.shape[2] == 1:
            return np.repeat(arr, 3, axis=2)
        return arr
    if c in ("grey", "gray", "l"):
        if arr.shape[2] == 3:
            return rgb_to_grey(arr)
        return arr
    if c == "y":
        if arr.shape[2] == 3:
            return rgb_to_luma_uint8(arr)
        return arr
    raise ValueError(f"channels must be None, 'rgb', 'grey' or 'y', got {channels!r} (for {source})")


def rgb_to_grey(arr: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` on a float ``(H, W, 3)`` array; returns ``(H, W, 1)`` float32."""
    w = np.asarray(GREY_WEIGHTS, dtype=np.float64)
    return (arr.astype(np.float64) @ w)[:, :, None].astype(np.float32)


def rgb_to_luma_uint8(arr: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` on a uint8 image, Y channel: ``16 + 65.481 R + 128.553 G + 24.966 B``
    (R, G, B in [0, 1]) rounded to 8 bits, as DnCNN-3's JPEG script makes grey images of colour
    sets; returns ``(H, W, 1)`` float32 in [0, 1]."""
    rgb = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0) / 255.0
    y = 16.0 + rgb @ np.array([65.481, 128.553, 24.966])
    return (np.round(y) / 255.0)[:, :, None].astype(np.float32)


def quantize_uint8(arr: np.ndarray) -> np.ndarray:
    """Round a float [0, 1] image to 8-bit levels (clip, x255, round half to even), keep float32."""
    return (np.round(np.clip(arr, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def write_image(path: str | os.PathLike, img: np.ndarray | torch.Tensor) -> Path:
    """Write a float [0, 1] image (HWC numpy or CHW tensor) as an 8-bit file (format by suffix)."""
    from PIL import Image

    if isinstance(img, torch.Tensor):
        img = to_numpy(img)
    arr = np.round(np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` numpy -> ``(C, H, W)`` float32 tensor (copy, contiguous)."""
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` tensor -> ``(H, W, C)`` float32 numpy array."""
    if t.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float32).permute(1, 2, 0).contiguous().numpy()


def stems(paths: Iterable[Path]) -> dict[str, Path]:
    """Map file stem -> path; raises if two files share a stem (e.g. ``a.png`` and ``a.jpg``)."""
    out: dict[str, Path] = {}
    for p in paths:
        if p.stem in out:
            raise ValueError(f"ambiguous image name {p.stem!r}: both {out[p.stem]} and {p}")
        out[p.stem] = p
    return out
