"""End to end with real weights: KAIR's released DnCNN-25 (grey, sigma 25) denoises real photos.

The checkpoint (MIT licence, a plain state dict of 34 entries) is the project's only real
pretrained network, so this test pins the whole path: preset -> strict load -> inference.
Measured here (fixed seeds, 256x256 centre crops, float noise unclipped):
camera 20.18 -> 30.03 dB, astronaut 20.14 -> 30.56 dB, coffee 20.15 -> 32.18 dB (gains 9.9-12.0 dB).
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import color, data

import harness.models as hm

WEIGHTS = Path(__file__).parent / "fixtures" / "weights" / "dncnn_25.pth"
SHA256_PREFIX = "0451a70d"
SIGMA = 25 / 255


def grey_crop(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Float grey image in [0, 1], centre crop size x size."""
    img = color.rgb2gray(image) if image.ndim == 3 else image.astype(np.float64) / 255.0
    h, w = img.shape
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size].astype(np.float32)


def psnr(pred: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB for float images with data range 1.0."""
    mse = np.mean((pred.astype(np.float64) - ref.astype(np.float64)) ** 2)
    return float(10 * np.log10(1.0 / mse))


def test_checkpoint_fixture_is_the_release():
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest().startswith(SHA256_PREFIX)


@pytest.fixture(scope="module")
def dncnn25():
    model = hm.create("dncnn_gray17")
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert len(state) == 34
    model.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    return model.eval()


def test_dncnn25_denoises_real_photos(dncnn25):
    photos = {"camera": data.camera(), "astronaut": data.astronaut(), "coffee": data.coffee()}
    clean = np.stack([grey_crop(img) for img in photos.values()])  # (3, 256, 256)
    rng = np.random.default_rng(0)
    noisy = clean + SIGMA * rng.standard_normal(clean.shape).astype(np.float32)  # unclipped
    with torch.no_grad():
        out = dncnn25(torch.from_numpy(noisy)[:, None]).squeeze(1).numpy()
    report = {}
    for i, name in enumerate(photos):
        before, after = psnr(noisy[i], clean[i]), psnr(out[i], clean[i])
        report[name] = (round(before, 2), round(after, 2))
        assert after - before > 8.0, f"{name}: {before:.2f} -> {after:.2f} dB"
    # Noise at sigma 25 on [0, 1] images: input PSNR ~ 20.2 dB; DnCNN-25 reaches ~29-32 dB here.
    assert all(19.5 < b < 21.0 and a > 28.5 for b, a in report.values()), report
