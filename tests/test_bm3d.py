"""BM3D / CBM3D baseline: the optional bm3d package run as a model (pip install -e .[classical])."""

import sys

import numpy as np
import pytest
import torch
from skimage import data

import harness.models as hm
from baselines.bm3d import BM3D


def noisy_crop(channels: int, sigma: float = 25.0):
    img = data.astronaut()[100:164, 180:244].astype(np.float64) / 255.0  # 64x64 RGB
    if channels == 1:
        img = img @ np.array([0.299, 0.587, 0.114])
        img = img[:, :, None]
    noisy = img + np.random.default_rng(0).standard_normal(img.shape) * sigma / 255.0
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float()  # noqa: E731
    return to_t(img), to_t(noisy)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # import bm3d -> ImportError
    _, noisy = noisy_crop(1)
    with pytest.raises(ImportError, match=r"pip install -e \.\[classical\]"):
        BM3D(1, noise_level=25)(noisy)


def test_sigma_is_required_and_checked():
    _, noisy = noisy_crop(1)
    with pytest.raises(ValueError, match="noise level"):
        BM3D(1)(noisy)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        BM3D(3, noise_level=25)(noisy)


def test_presets_take_sigma_from_the_task():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.models.registry import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=evaluate", "model=bm3d_gray", "task=denoise_gray50"])
    model = hm.build(OmegaConf.to_container(cfg.model, resolve=True))
    assert isinstance(model, BM3D) and model.noise_level == 50 and model.in_nc == 1
    assert sum(p.numel() for p in model.parameters()) == 0


@pytest.mark.parametrize("channels", [1, 3])
def test_bm3d_is_the_package_output_and_denoises(channels):
    bm3d = pytest.importorskip("bm3d")
    clean, noisy = noisy_crop(channels)
    out = BM3D(channels, noise_level=25)(noisy)
    z = noisy[0].permute(1, 2, 0).double().numpy()
    direct = bm3d.bm3d(z[:, :, 0], sigma_psd=25 / 255) if channels == 1 else bm3d.bm3d_rgb(z, sigma_psd=25 / 255)
    direct = torch.from_numpy(np.ascontiguousarray(direct).reshape(64, 64, channels)).permute(2, 0, 1)[None].float()
    # the package's filtering is float32 inside and not bit-identical between calls
    assert (out - direct).abs().max().item() < 1e-5
    psnr = lambda a: -10 * torch.log10(((a - clean) ** 2).mean()).item()  # noqa: E731
    assert psnr(out) - psnr(noisy) > 6.0, (psnr(noisy), psnr(out))
