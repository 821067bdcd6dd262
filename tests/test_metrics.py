"""PSNR/SSIM: values known from first principles or hand computation, torch == float64 numpy
reference, protocol records, per-image results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.metrics import MetricAccumulator, MetricResult, evaluate_pair_batch, protocol_record, psnr, rgb_to_y, ssim
from harness.metrics.reference import psnr_np, ssim_np

FIXTURES = Path(__file__).parent / "fixtures" / "lpips_calibration"
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def levels(v: np.ndarray | float, dtype=torch.float32) -> torch.Tensor:
    """Integer grey levels -> float tensor in [0, 1]."""
    return torch.as_tensor(np.asarray(v, dtype=np.float64) / 255.0, dtype=dtype)


def random_levels(shape, seed=0, lo=20, hi=230) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return levels(rng.integers(lo, hi, size=shape))


# -- PSNR from first principles ---------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["basicsr", "eamamba"])
def test_psnr_constant_offset_per_image(protocol):
    gt = random_levels((3, 3, 24, 20))
    ks = torch.tensor([1.0, 5.0, 10.0])
    pred = gt + ks.view(3, 1, 1, 1) / 255.0
    got = psnr(pred, gt, protocol=protocol)
    expected = [20 * math.log10(255 / k) for k in (1, 5, 10)]  # MSE = k^2
    assert got.shape == (3,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_psnr_grey_offset():
    gt = random_levels((2, 1, 16, 16))
    got = psnr(gt + 3 / 255.0, gt)
    np.testing.assert_allclose(got.numpy(), [20 * math.log10(255 / 3)] * 2, atol=1e-6)


def test_psnr_y_channel_offset():
    # +k on R, G and B moves Y by k * (65.481 + 128.553 + 24.966) / 255 = k * 219 / 255.
    gt = random_levels((1, 3, 16, 16))
    k = 4
    got = psnr(gt + k / 255.0, gt, y_channel=True).item()
    assert got == pytest.approx(20 * math.log10(255 / (k * 219 / 255)), abs=1e-6)


def test_y_channel_range():
    white, black = torch.ones(1, 3, 2, 2, dtype=torch.float64) * 255, torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(rgb_to_y(white), torch.tensor(235.0, dtype=torch.float64))
    assert torch.allclose(rgb_to_y(black), torch.tensor(16.0, dtype=torch.float64))


def test_basicsr_rounds_eamamba_does_not():
    gt = random_levels((1, 3, 16, 16))
    pred = gt + 0.3 / 255.0  # rounds back onto gt under uint8 quantisation
    assert psnr(pred, gt, protocol="basicsr").item() == math.inf
    assert psnr(pred, gt, protocol="eamamba").item() == pytest.approx(20 * math.log10(255 / 0.3), abs=1e-4)


def test_identical_images_give_inf_and_one():
    gt = random_levels((2, 3, 32, 32))
    for protocol in ("basicsr", "eamamba"):
        assert torch.isinf(psnr(gt, gt, protocol=protocol)).all()
        np.testing.assert_allclose(ssim(gt, gt, protocol=protocol).numpy(), 1.0, atol=1e-12)


def test_clamping_before_scoring():
    gt = torch.ones(1, 3, 16, 16)
    assert psnr(gt + 0.5, gt).item() == math.inf  # 1.5 clamps to 1
    zero = torch.zeros(1, 1, 16, 16)
    assert psnr(zero - 0.2, zero, protocol="eamamba").item() == math.inf


def test_crop_border_removes_border_errors():
    gt = random_levels((1, 3, 20, 20))
    pred = gt.clone()
    pred[..., :2, :] += 10 / 255.0
    pred[..., :, -2:] -= 10 / 255.0
    assert math.isfinite(psnr(pred, gt).item())
    assert psnr(pred, gt, crop_border=2).item() == math.inf
    assert ssim(pred, gt, crop_border=2).item() == pytest.approx(1.0, abs=1e-12)


def test_psnr_matches_pyiqa_calibration_values():
    """RGB PSNR on the five Kodak/TID2013 pairs, as listed in pyiqa's calibration summary."""
    from PIL import Image

    def load(p):
        return torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255.0).permute(2, 0, 1)

    names = ["I03", "I04", "I06", "I08", "I19"]
    ref = torch.stack([load(FIXTURES / f"ref_{n}.png") for n in names])
    dist = torch.stack([load(FIXTURES / f"dist_{n}.png") for n in names])
    expected = [21.1136, 20.9872, 27.0139, 23.3002, 21.6186]
    np.testing.assert_allclose(psnr(dist, ref).numpy(), expected, atol=6e-5)


# -- SSIM by hand -----------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["basicsr", "eamamba"])
def test_ssim_constant_images(protocol):
    # Constant images: both variances and the covariance are 0, so SSIM = (2ab + C1)/(a^2 + b^2 + C1).
    a, b = 100.0, 110.0
    # float64 inputs: the eamamba protocol scores floats as given (no rounding to hide float32 error)
    x = levels(np.full((1, 1, 25, 25), a), torch.float64)
    y = levels(np.full((1, 1, 25, 25), b), torch.float64)
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert expected == pytest.approx(0.99547644, abs=1e-8)  # 22006.5025 / 22106.5025 = 1 - 100/22106.5025
    assert ssim(x, y, protocol=protocol).item() == pytest.approx(expected, abs=1e-12)


def test_ssim_hand_computed_mirror_pattern():
    """11x11 images: the valid region is one window. x = a + d*s, y = a - d*s with s = +1 left of
    the centre column, 0 on it, -1 right of it. The symmetric window gives mean a for both, so the
    luminance term is 1; var_x = var_y = d^2 (1 - g5), cov = -var, with g5 the centre weight of
    the normalised 1-D Gaussian. SSIM = (C2 - 2 var) / (C2 + 2 var)."""
    a, d = 128, 20
    s = np.sign(5 - np.arange(11))[None, :].repeat(11, axis=0)
    x, y = levels((a + d * s)[None, None]), levels((a - d * s)[None, None])
    g = [math.exp(-(k * k) / (2 * 1.5**2)) for k in range(-5, 6)]
    g5 = 1.0 / sum(g)
    var = d * d * (1 - g5)
    expected = (C2 - 2 * var) / (C2 + 2 * var)
    assert expected == pytest.approx(-0.81874, abs=1e-4)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-10)
    assert ssim_np(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy()) == pytest.approx(expected, abs=1e-10)


def test_ssim_eamamba_extra_crop():
    # A 31x31 image has a 21x21 valid SSIM map; map row r sees image rows r..r+10. Changing image
    # rows 0..4 touches map rows 0..4 only, exactly the 5 rows the eamamba protocol crops away.
    gt = random_levels((1, 1, 31, 31))
    pred = gt.clone()
    pred[..., :5, :] = 0.0
    assert ssim(pred, gt, protocol="basicsr").item() < 0.99
    assert ssim(pred, gt, protocol="eamamba").item() == pytest.approx(1.0, abs=1e-12)
    pred[..., 5, :] = 0.0  # now map row 5 changes too, which eamamba keeps
    assert ssim(pred, gt, protocol="eamamba").item() < 1 - 1e-6


def test_ssim_too_small_raises():
    x = torch.rand(1, 3, 10, 10)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)
    with pytest.raises(ValueError, match="at least 21x21"):
        ssim(torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 20), protocol="eamamba")


# -- torch == numpy reference -----------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["basicsr", "eamamba"])
@pytest.mark.parametrize("y_channel,crop,channels", [(False, 0, 3), (True, 4, 3), (True, 3, 1), (False, 2, 1)])
def test_torch_matches_numpy_reference(protocol, y_channel, crop, channels):
    torch.manual_seed(0)
    gt = torch.rand(3, channels, 41, 37)
    pred = gt + 0.08 * torch.randn_like(gt)  # leaves [0, 1]: exercises the clamp
    got_p = psnr(pred, gt, crop_border=crop, y_channel=y_channel, protocol=protocol)
    got_s = ssim(pred, gt, crop_border=crop, y_channel=y_channel, protocol=protocol)
    for i in range(3):
        p, g = pred[i].permute(1, 2, 0).numpy(), gt[i].permute(1, 2, 0).numpy()
        assert got_p[i].item() == pytest.approx(psnr_np(p, g, crop, y_channel, protocol), abs=1e-10)
        assert got_s[i].item() == pytest.approx(ssim_np(p, g, crop, y_channel, protocol), abs=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    torch.manual_seed(1)
    gt = torch.rand(2, 3, 64, 48)
    pred = gt + 0.05 * torch.randn_like(gt)
    for protocol in ("basicsr", "eamamba"):
        for f in (psnr, ssim):
            cpu = f(pred, gt, y_channel=True, crop_border=2, protocol=protocol)
            gpu = f(pred.cuda(), gt.cuda(), y_channel=True, crop_border=2, protocol=protocol)
            assert gpu.device.type == "cuda"
            np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-10)


def test_input_errors():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match="unknown metric protocol"):
        psnr(x, x, protocol="matlab")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        psnr(x[0], x[0])
    with pytest.raises(ValueError, match="crop_border"):
        psnr(x, x, crop_border=8)


# -- records ----------------------------------------------------------------------------------

def test_protocol_records():
    r = protocol_record("psnr", protocol="basicsr", y_channel=True, crop_border=4)
    assert r["metric"] == "psnr" and r["protocol"] == "basicsr" and r["crop_border"] == 4
    assert r["space"].startswith("Y") and "uint8" in r["quantize"]
    s = protocol_record("ssim", protocol="eamamba")
    assert s["extra_crop"] == 5 and s["space"] == "RGB" and s["quantize"].startswith("none")
    assert protocol_record("ssim", channels=1)["space"] == "grey"


def test_evaluate_pair_batch_keeps_per_image_values_and_protocol():
    gt = random_levels((3, 3, 24, 24))
    pred = gt + torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1) / 255.0
    res = evaluate_pair_batch(pred, gt, metrics=("psnr", "ssim"), y_channel=False, crop_border=1,
                              names=["a", "b", "c"])
    assert set(res) == {"psnr", "ssim"}
    p = res["psnr"]
    assert isinstance(p, MetricResult) and p.names == ["a", "b", "c"] and len(p.values) == 3
    np.testing.assert_allclose(p.values, [20 * math.log10(255 / k) for k in (1, 2, 4)], atol=1e-6)
    assert p.mean == pytest.approx(np.mean(p.values))
    assert p.protocol["crop_border"] == 1 and p.protocol["protocol"] == "basicsr"
    json.dumps(p.to_dict())  # serialisable


def test_accumulator_over_batches():
    acc = MetricAccumulator(("psnr",), protocol="eamamba")
    gt = random_levels((2, 3, 16, 16))
    acc.update(gt + 1 / 255.0, gt, ["x", "y"])
    acc.update(gt, gt, ["z", "w"])
    r = acc.results()["psnr"]
    assert r.names == ["x", "y", "z", "w"]
    assert math.isinf(r.values[2]) and math.isinf(r.mean)
    assert r.protocol["protocol"] == "eamamba"
    with pytest.raises(ValueError, match="protocol changed"):
        acc.update(gt[:, :1], gt[:, :1], ["g1", "g2"])


def test_metric_registry_drives_the_accumulator():
    from harness.metrics import METRICS, Metric, get_metric, register_metric

    assert list(METRICS)[:3] == ["psnr", "ssim", "lpips"]
    assert get_metric("lpips").higher_is_better is False and get_metric("ssim").digits == 4
    with pytest.raises(ValueError, match="unknown metric 'nope'; known: \\['psnr', 'ssim', 'lpips'"):
        get_metric("nope")
    mae = Metric("mae_t", lambda pred, gt, s: (pred - gt).abs().flatten(1).mean(1),
                 lambda s, channels: {"metric": "mae_t", "channels": channels}, False, "", 4, "MAE")
    register_metric(mae)
    try:
        pred, gt = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, 3, 4, 4)
        pred[1] = 0.25
        acc = MetricAccumulator(("psnr", "mae_t"))
        acc.update(pred, gt, ["a", "b"])
        res = acc.results()
        assert res["mae_t"].values == [0.5, 0.25] and res["mae_t"].protocol == {"metric": "mae_t", "channels": 3}
        assert res["psnr"].values == pytest.approx([20 * math.log10(1 / 0.5), 20 * math.log10(1 / 0.25)], abs=0.05)
        with pytest.raises(ValueError, match="already registered"):
            register_metric(mae)
    finally:
        del METRICS["mae_t"]
