"""Degradations and scoring protocols of the published tables, checked against hand-computed values.

* JPEG: libjpeg through Pillow at IJG quality q must use the standard IJG luminance table scaled as
  ``jpeg_set_quality`` does (the tables MATLAB's ``imwrite(..., 'Quality', q)`` writes), and a
  constant 16x16 block decodes to the value the DC quantisation step gives by hand.
* Luma: MATLAB ``rgb2ycbcr`` on uint8 pixels.
* SR feed: a scale-1 model with ``sr_input: bicubic`` is fed the MATLAB-bicubic-upscaled Y and
  scored in float with a border of s, as ``Demo_test_DnCNN3.m`` does.
"""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from harness.data import SingleFolderDataset, imresize, make_degradation, write_image
from harness.data.degrade import jpeg_bytes
from harness.data.imageio import rgb_to_luma_uint8
from harness.evaluate import evaluate

# ITU-T T.81 Annex K.1 luminance quantisation table (natural order), the IJG default.
IJG_LUMINANCE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]


def ijg_table(quality: int) -> list[int]:
    """libjpeg jpeg_quality_scaling + jpeg_add_quant_table(force_baseline=TRUE), by hand."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((t * scale + 50) // 100, 1), 255) for t in IJG_LUMINANCE]


@pytest.mark.parametrize("quality", [10, 20, 30, 40])
def test_jpeg_uses_ijg_tables_scaled_by_quality(quality):
    u8 = (np.random.default_rng(quality).random((32, 32, 1)) * 255).astype(np.uint8)
    with Image.open(io.BytesIO(jpeg_bytes(u8, quality))) as im:
        tables = im.quantization
        assert im.mode == "L" and len(tables) == 1  # grey: one component, one table
    assert list(tables[0]) == ijg_table(quality)


@pytest.mark.parametrize("quality, expected", [(10, 98), (20, 98), (30, 101)])
def test_jpeg_constant_block_by_hand(quality, expected):
    # A constant block of 100 has only a DC coefficient: 8 * (100 - 128) = -224. With the DC step
    # q0 of the scaled table it comes back as 128 + round(-224 / q0) * q0 / 8:
    # q10: step 80 -> -3 * 80 / 8 = -30 -> 98; q20: step 40 -> -6 * 40 / 8 = -30 -> 98;
    # q30: step 27 -> -8 * 27 / 8 = -27 -> 101.
    q0 = ijg_table(quality)[0]
    assert 128 + round(-224 / q0) * q0 / 8 == expected
    deg = make_degradation({"name": "jpeg", "quality": quality})
    lq, record = deg(np.full((16, 16, 1), 100 / 255, np.float32), seed=0)
    assert np.array_equal(np.round(lq * 255), np.full((16, 16, 1), expected))
    assert record["params"] == {"quality": quality, "subsampling": "4:2:0"} and record["sampled"]["bytes"] > 0


def test_jpeg_rejects_bad_quality():
    with pytest.raises(ValueError, match="quality must be an integer in 1..100"):
        make_degradation({"name": "jpeg", "quality": 0})


def test_luma_of_uint8_pixels_as_matlab_rgb2ycbcr():
    rgb = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]]], np.float32)
    y = np.round(rgb_to_luma_uint8(rgb)[0, :, 0] * 255).astype(int)
    # 16 + 65.481, 16 + 128.553, 16 + 24.966, 16 + 219, 16, each rounded
    assert y.tolist() == [81, 145, 41, 235, 16]


class IdentityOnY(nn.Module):
    """A 'model' that returns its input, with DnCNN-3's feeding metadata."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)  # one input channel, so the harness feeds Y
        self.eabench_meta = {"sr_input": "bicubic", "scale": 1, "in_channels": 1}

    def forward(self, x):
        return x


def test_sr_feed_is_bicubic_upscaled_y_scored_in_float(tmp_path):
    rng = np.random.default_rng(0)
    hr = np.round(rng.random((26, 30, 3)) * 255) / 255  # 8-bit RGB, not a multiple of 4
    write_image(tmp_path / "img.png", torch.from_numpy(hr).permute(2, 0, 1).float())
    ds = SingleFolderDataset(tmp_path, {"name": "bicubic_down", "scale": 4})
    out = evaluate(IdentityOnY(), ds, metrics=("psnr", "ssim"), protocol="float", crop_border=4, y_channel=True,
                   scale=4, score_input=False)
    # By hand: modcrop to 24x28, MATLAB bicubic down (rounded to uint8), bicubic up, Y of both, crop 4.
    gt = hr[:24, :28]
    lr = np.round(np.clip(imresize(gt, 1 / 4), 0, 1) * 255) / 255
    up = imresize(lr, 4)
    luma = lambda x: 16 + x @ np.array([65.481, 128.553, 24.966])  # noqa: E731 - 0..255 scale
    err = (luma(up) - luma(gt))[4:-4, 4:-4]
    expected = 10 * math.log10(255**2 / np.mean(err**2))
    assert out["results"]["psnr"].values[0] == pytest.approx(expected, abs=1e-4)
    assert out["results"]["psnr"].protocol["protocol"] == "float"
    assert out["results"]["psnr"].protocol["space"] == "grey"  # the Y image is what is scored


def test_float_protocol_neither_rounds_nor_clips():
    from harness.metrics import psnr

    gt = torch.zeros(1, 1, 16, 16)
    pred = torch.full((1, 1, 16, 16), -0.4 / 255)  # below 0: clipped or rounded it would be exact
    assert psnr(pred, gt, protocol="float").item() == pytest.approx(20 * math.log10(255 / 0.4), abs=1e-4)
    assert psnr(pred, gt, protocol="basicsr").item() == math.inf


def test_jpeg_task_reads_colour_sets_as_luma(tmp_path):
    # DnCNN-3's JPEG script deblocks the rgb2ycbcr luma of colour sets (LIVE1), not rgb2gray.
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.data import build_dataset
    from harness.models.registry import CONF_DIR

    (tmp_path / "LIVE1").mkdir()
    red = torch.zeros(3, 16, 16)
    red[0] = 1.0
    write_image(tmp_path / "LIVE1" / "red.png", red)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=evaluate", "data=benchmark", f"data.root={tmp_path}",
                                                       "data.name=LIVE1", "task=jpeg_q40", "model=dncnn_gray20"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    item = build_dataset({**cfg["data"]["test"], "degradation": cfg["task"]["degradation"]})[0]
    assert item["gt"].shape == (1, 16, 16)
    assert torch.equal(item["gt"] * 255, torch.full((1, 16, 16), 81.0))  # round(16 + 65.481)
    assert item["degradation"]["name"] == "jpeg"
