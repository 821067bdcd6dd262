"""Effective receptive fields: the exact support of a pure conv net, area ratios, NaN handling, figures."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import harness.models as hm
from harness.erf import area_ratios, compute_erf, erf_grid, save_erf, scale_for_display, square_sides

WEIGHTS = Path(__file__).parent / "fixtures" / "weights" / "dncnn_25.pth"
RF = 35  # DnCNN-17: 17 3x3 convolutions -> 1 + 2*17 = 35


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine: see tests/test_profile.py
    yield
    torch.set_num_threads(before)


def dncnn17() -> nn.Module:
    """DnCNN-17 grey: the real release (KAIR dncnn_25) when the preset and fixture exist."""
    if "dncnn_gray17" in hm.available():
        model = hm.create("dncnn_gray17")
        if WEIGHTS.is_file():
            model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
        return model
    layers = [nn.Conv2d(1, 64, 3, padding=1), nn.ReLU()]
    for _ in range(15):
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(64, 1, 3, padding=1))
    return nn.Sequential(*layers)


def support_box(erf_map):
    rows, cols = np.nonzero(erf_map)
    return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.mark.parametrize("target", [None, (20, 40)], ids=["centre", "off-centre"])
def test_conv_net_erf_is_exactly_its_theoretical_receptive_field(target):
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 64)
    erf, info = compute_erf(dncnn17(), images, target=target, return_info=True)
    r, c = target or (32, 32)
    half = RF // 2
    assert erf.shape == (64, 64) and info["target"] == (r, c) and info["n_used"] == 2
    inside = np.zeros_like(erf, dtype=bool)
    inside[r - half:r + half + 1, c - half:c + half + 1] = True
    assert inside.sum() == RF * RF
    assert np.all(erf[~inside] == 0.0), "gradient outside the 35x35 receptive field"
    assert np.all(erf[inside] > 0.0), "zero gradient inside the receptive field"
    assert support_box(erf) == (r - half, r + half, c - half, c + half)


def test_relu_rectifier_is_non_negative_and_confined():
    erf = compute_erf(dncnn17(), torch.rand(1, 1, 48, 48), rectifier="relu")
    assert erf.min() >= 0 and erf.max() > 0
    r0, r1, c0, c1 = support_box(erf)
    assert r0 >= 24 - 17 and r1 <= 24 + 17 and c0 >= 24 - 17 and c1 <= 24 + 17
    with pytest.raises(ValueError, match="rectifier"):
        compute_erf(dncnn17(), torch.rand(1, 1, 8, 8), rectifier="square")


def test_preset_name_checkpoint_crop_and_image_formats():
    if "dncnn_gray17" not in hm.available() or not WEIGHTS.is_file():
        pytest.skip("dncnn_gray17 preset or the dncnn_25 fixture is missing")
    rng = np.random.default_rng(0)
    uint8_hwc = [rng.integers(0, 256, (80, 90, 3), dtype=np.uint8) for _ in range(2)]  # colour -> grey model
    erf, info = compute_erf("dncnn_gray17", uint8_hwc, checkpoint=WEIGHTS, input_size=40, return_info=True)
    assert erf.shape == (40, 40) and info["n_used"] == 2 and erf[20, 20] > 0


def test_any_preset_on_cpu_including_a_mamba_and_sr_model():
    erf = compute_erf("eamamba_tiny", torch.rand(2, 3, 32, 32))
    assert erf.shape == (32, 32) and np.isfinite(erf).all() and erf[16, 16] > 0
    # Mamba routes see the whole image: no exact zeros far from the target (unlike a conv net).
    assert (erf > 0).mean() > 0.9
    if "eamamba_sr_tiny" in hm.available():
        erf_sr, info = compute_erf("eamamba_sr_tiny", torch.rand(1, 3, 16, 16), return_info=True)
        scale = hm.preset_meta("eamamba_sr_tiny")["scale"]
        assert erf_sr.shape == (16, 16) and info["target"] == (8 * scale, 8 * scale)


class NaNForBrightImages(nn.Module):
    """Produces NaN for images whose mean exceeds 0.5 (as a diverged model would)."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        bright = x.mean(dim=(1, 2, 3), keepdim=True) > 0.5
        return y * torch.where(bright, float("nan"), 1.0)  # per image: no NaN leaks into the others


def test_nan_maps_are_skipped_and_counted_any_channel_count():
    images = torch.cat([torch.full((2, 4, 9, 9), 0.2), torch.full((3, 4, 9, 9), 0.8)])
    with pytest.warns(RuntimeWarning, match="skipped 3 of 5"):
        erf, info = compute_erf(NaNForBrightImages(4), images, batch_size=2, return_info=True)
    assert info["n_skipped"] == 3 and info["n_used"] == 2 and np.isfinite(erf).all()
    assert support_box(erf) == (3, 5, 3, 5)  # one 3x3 conv around the centre (4, 4)
    with pytest.raises(RuntimeError, match="all 3"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compute_erf(NaNForBrightImages(4), torch.full((3, 4, 9, 9), 0.9))


def brute_force_ratio(m, t):
    """Independent reference: grow centred odd squares one pixel per side at a time."""
    h, w = m.shape
    cr, cc = h // 2, w // 2
    total = m.sum()
    for r in range(max(h, w)):
        block = m[max(0, cr - r):cr + r + 1, max(0, cc - r):cc + r + 1]
        if block.sum() >= t * total * (1 - 1e-12):
            return block.shape[0] * block.shape[1] / (h * w)
    return 1.0


def test_area_ratios_known_answers():
    delta = np.zeros((64, 64))
    delta[32, 32] = 5.0
    assert area_ratios(delta) == {t: pytest.approx(1 / (64 * 64)) for t in (0.2, 0.3, 0.5, 0.99)}
    uniform = np.ones((65, 65))
    for t, ratio in area_ratios(uniform).items():
        side = next(s for s in range(1, 66, 2) if s * s >= t * 65 * 65)
        assert ratio == pytest.approx(side * side / 65 ** 2), t
    assert area_ratios(uniform, thresholds=(1.0,))[1.0] == 1.0
    assert square_sides(uniform, (0.2,))[0.2] == (31, 31)  # 29^2 = 841 < 845 = 0.2 * 65^2 <= 31^2
    rng = np.random.default_rng(1)
    m = rng.random((40, 52)) ** 4
    for t, ratio in area_ratios(m, (0.1, 0.2, 0.3, 0.5, 0.9, 0.99)).items():
        assert ratio == pytest.approx(brute_force_ratio(m, t)), t
    # Scaling is applied before the ratios when asked (as the figures are).
    assert area_ratios(m, scaling="power0.25") == {t: pytest.approx(brute_force_ratio(scale_for_display(m), t))
                                                   for t in (0.2, 0.3, 0.5, 0.99)}
    with pytest.raises(ValueError):
        area_ratios(np.zeros((8, 8)))


def test_scale_for_display():
    v = np.array([[0.0, 1.0], [16.0, 81.0]])
    np.testing.assert_allclose(scale_for_display(v, "power0.25"), [[0, 1 / 3], [2 / 3, 1]])
    np.testing.assert_allclose(scale_for_display(v, "power0.2"), (v ** 0.2) / 81 ** 0.2)
    np.testing.assert_allclose(scale_for_display(v, "log10"), np.log10(v + 1) / np.log10(82))
    np.testing.assert_allclose(scale_for_display(v, "none"), v / 81)
    with pytest.raises(ValueError, match="scaling"):
        scale_for_display(v, "sqrt")


def test_save_erf_and_grid_write_files(tmp_path):
    rng = np.random.default_rng(0)
    a = np.outer(np.hanning(33), np.hanning(33)) + 1e-6
    b = rng.random((33, 33))
    info = {"rectifier": "abs", "target": (16, 16), "n_used": 4, "n_skipped": 1}
    paths = save_erf(a, tmp_path / "erf", "model_a", "power0.25", info=info, caption="CPU test")
    np.testing.assert_array_equal(np.load(paths["npy"]), a)
    assert Path(paths["png"]).name == "model_a_power0.25.png" and Path(paths["png"]).stat().st_size > 5_000
    for normalize in ("each", "global"):
        grid = erf_grid({"model_a": a, "model_b": b, "model_c": a * 3}, tmp_path / f"grid_{normalize}.png",
                        "log10", normalize=normalize)
        assert Path(grid).stat().st_size > 10_000
