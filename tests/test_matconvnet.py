"""The authors' MatConvNet releases (DnCNN-S/B/3, CDnCNN-B, FDnCNN, FFDNet) in the harness's own modules.

Files: ``$EABENCH_DATA/../weights/matconvnet/*.mat`` (MATLAB v7.3 simplenn, byte-identical to
cszn/DnCNN and cszn/FFDNet; sha256 in :mod:`harness.weights`).

How the reference PSNRs below were cross-checked (once, when they were recorded):

* DnCNN-S σ25: the loaded ``sigma=25.mat`` weights equal KAIR's ``dncnn_25.pth`` (the PyTorch
  release of the same network) exactly, tensor for tensor (asserted in
  :func:`test_dncnn_s_sigma25_equals_kair_release`), so both give the same outputs; that file
  reproduces the published BSD68/Set12 averages through ``experiment=evaluate`` (issue 17).
* FFDNet: the permuted weights are checked against a literal re-implementation of MatConvNet's
  ``vl_nnSubP`` index formula with the file's raw filters (:func:`test_ffdnet_matches_matconvnet_subp`);
  without the permutation grey FFDNet loses 2.4 dB on Set12/01 (29.95 -> 27.57 at 256²).
* Each model's numbers sit where the papers put it relative to the others: DnCNN-S at its own σ
  above DnCNN-B and DnCNN-3; FDnCNN/FFDNet within ~0.5 dB of DnCNN-S; CDnCNN-B below FFDNet
  on McMaster (the FFDNet paper's Table: CDnCNN is weakest on McMaster).

Images: centre crops (48x48 and an odd 47x49, which exercises FFDNet's padding) of Set12 01/05
(grey) and McMaster 1/10 (colour), noise from ``np.random.default_rng(i)`` for image i (float,
unclipped), PSNR as the authors' ``Cal_PSNRSSIM`` on ``im2uint8`` images (no border).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import harness.models as hm
from harness.checkpoints import CheckpointError, load_weights
from harness.data import read_image
from harness.models.registry import MODEL_DIR
from harness.matconvnet import MatConvNetError, parameter_count, read_simplenn
from harness.weights import WEIGHTS, for_preset, get

MAT = {name: w for name, w in WEIGHTS.items() if w.file.endswith(".mat")}

# (conv layers, relu, concat, SubP, first conv (Cout, Cin, 3, 3) -> Cin, last conv Cout, parameters)
STRUCTURE = {
    "dncnn_s_sigma15": (17, 16, 0, 0, 1, 1, 555_137),
    "dncnn_s_sigma25": (17, 16, 0, 0, 1, 1, 555_137),
    "dncnn_s_sigma50": (17, 16, 0, 0, 1, 1, 555_137),
    "dncnn_b_gray_blind": (20, 19, 0, 0, 1, 1, 665_921),
    "dncnn3": (20, 19, 0, 0, 1, 1, 665_921),
    "cdncnn_b_color_blind": (20, 19, 0, 0, 3, 3, 668_227),
    "fdncnn_gray": (20, 19, 1, 0, 2, 1, 666_497),
    "fdncnn_color": (20, 19, 1, 0, 4, 3, 668_803),
    "ffdnet_gray": (15, 14, 1, 2, 5, 4, 485_316),
    "ffdnet_color": (12, 11, 1, 2, 13, 12, 852_108),
}

# PSNR (dB) per image, recorded once with this loader and cross-checked as the docstring says.
SIGMA = {"dncnn_s_sigma15": 15, "dncnn_s_sigma50": 50}
REFERENCE_PSNR = {
    "dncnn_s_sigma15": (31.6822, 30.6215),
    "dncnn_s_sigma25": (28.6019, 27.7399),
    "dncnn_s_sigma50": (24.5492, 23.7218),
    "dncnn_b_gray_blind": (28.4257, 27.7348),
    "dncnn3": (27.8826, 27.5569),
    "fdncnn_gray": (28.6333, 27.7274),
    "ffdnet_gray": (28.1798, 27.4611),
    "cdncnn_b_color_blind": (24.5263, 30.2040),
    "fdncnn_color": (27.2503, 30.6993),
    "ffdnet_color": (26.8279, 30.4623),
}
GREY_IMAGES = (("Set12/01.png", (48, 48)), ("Set12/05.png", (47, 49)))
COLOUR_IMAGES = (("McMaster/1.png", (48, 48)), ("McMaster/10.png", (47, 49)))


@pytest.fixture(scope="module")
def mat_dir(eabench_weights):
    return eabench_weights / "matconvnet"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def _loaded(name: str, mat_dir):
    """The preset with the release loaded (once per test session; tests only read it)."""
    entry = get(name)
    model = hm.create(entry.preset).eval()
    info = load_weights(model, mat_dir / entry.file, strict=True)
    assert info["key"] == "matconvnet/simplenn" and info["registered"] == name
    return model


def test_registry_covers_every_file(mat_dir):
    """One entry per shared .mat file, sha256 as published, presets that exist."""
    assert {w.file for w in MAT.values()} == {p.name for p in mat_dir.glob("*.mat")}
    sums = dict(line.split()[::-1] for line in (mat_dir / "SHA256SUMS").read_text().splitlines() if line.strip())
    for w in MAT.values():
        assert sums[w.file] == w.sha256, w.name
        assert w.preset in hm.available()
        assert w.url.startswith("https://raw.githubusercontent.com/cszn/") and w.input_range == (0.0, 1.0)
    assert {w.name for w in for_preset("dncnn_gray20")} == {"dncnn_b_gray_blind", "dncnn3"}
    with pytest.raises(KeyError, match="registered: "):
        get("dncnn_s_sigma35")


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_mat_structure_and_parameter_count(name, mat_dir):
    convs, relus, concats, subps, first_in, last_out, params = STRUCTURE[name]
    path = mat_dir / get(name).file
    assert _sha256(path) == get(name).sha256
    layers = read_simplenn(path)
    kinds = [layer.type for layer in layers]
    assert (kinds.count("conv"), kinds.count("relu"), kinds.count("concat"), kinds.count("SubP")) == \
        (convs, relus, concats, subps)
    conv = [layer for layer in layers if layer.type == "conv"]
    assert conv[0].weight.shape[1:] == (first_in, 3, 3) and conv[-1].weight.shape[0] == last_out
    assert all(layer.attrs["pad"] == [1.0] and layer.attrs["stride"] == [1.0] for layer in conv)
    assert parameter_count(layers) == params
    model = _loaded(name, mat_dir)
    assert sum(p.numel() for p in model.parameters()) == params == model.eabench_meta["official_params"]


def test_dncnn_s_sigma25_equals_kair_release(mat_dir, eabench_weights):
    """MatConvNet sigma=25.mat and KAIR's dncnn_25.pth hold the same network, bit for bit."""
    from_mat = _loaded("dncnn_s_sigma25", mat_dir).state_dict()
    from_pth = hm.create("dncnn_gray17")
    load_weights(from_pth, eabench_weights / get("kair_dncnn_25").file)
    for key, value in from_pth.state_dict().items():
        assert torch.equal(from_mat[key], value), key


def _subp_matlab(x: np.ndarray, up: bool) -> np.ndarray:
    """MatConvNet vl_nnSubP (scale 1/2 or 2) on an (H, W, C) array, written from its index formula."""
    if not up:
        h, w, c = x.shape
        y = np.zeros((h // 2, w // 2, 4 * c), x.dtype)
        for ch in range(c):
            for i in range(4):
                a, b = i % 2, i // 2  # row offset varies fastest
                y[:, :, 4 * ch + i] = x[a::2, b::2, ch]
        return y
    h, w, c4 = x.shape
    y = np.zeros((2 * h, 2 * w, c4 // 4), x.dtype)
    for ch in range(c4 // 4):
        for i in range(4):
            a, b = i % 2, i // 2
            y[a::2, b::2, ch] = x[:, :, 4 * ch + i]
    return y


@pytest.mark.parametrize("name", ["ffdnet_gray", "ffdnet_color"])
def test_ffdnet_matches_matconvnet_subp(name, mat_dir):
    """Our pixel-unshuffle model with permuted weights == the file's raw layers run the MATLAB way."""
    model = _loaded(name, mat_dir)
    c = model.in_nc
    x = torch.rand(1, c, 12, 10, generator=torch.Generator().manual_seed(3))
    sigma = 30.0
    ref = _subp_matlab(x[0].permute(1, 2, 0).numpy(), up=False)
    ref = np.concatenate([ref, np.full(ref.shape[:2] + (1,), sigma / 255, np.float32)], axis=2)
    t = torch.from_numpy(ref).permute(2, 0, 1)[None]
    for layer in read_simplenn(mat_dir / get(name).file):
        if layer.type == "conv":
            t = F.conv2d(t, layer.weight, layer.bias, padding=1)
        elif layer.type == "relu":
            t = t.clamp_min(0)
    ref_out = _subp_matlab(t[0].permute(1, 2, 0).numpy(), up=True)
    with torch.no_grad():
        out = model(x, sigma=sigma)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, ref_out, atol=2e-5)


def _crop(img: np.ndarray, size) -> torch.Tensor:
    (h, w), (ch, cw) = img.shape[:2], size
    top, left = (h - ch) // 2, (w - cw) // 2
    return torch.from_numpy(np.ascontiguousarray(img[top:top + ch, left:left + cw])).permute(2, 0, 1)[None]


def _psnr_uint8(out: torch.Tensor, gt: torch.Tensor) -> float:
    """Cal_PSNRSSIM(im2uint8(label), im2uint8(output), 0, 0)'s PSNR."""
    a = np.round(np.clip(out.numpy().astype(np.float64), 0, 1) * 255)
    b = np.round(np.clip(gt.numpy().astype(np.float64), 0, 1) * 255)
    return float(10 * np.log10(255**2 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("name", sorted(REFERENCE_PSNR))
def test_per_image_psnr_on_real_images(name, mat_dir, eabench_data):
    model = _loaded(name, mat_dir)
    sigma = SIGMA.get(name, 25)
    colour = model.eabench_meta["in_channels"] == 3
    for i, (rel, size) in enumerate(COLOUR_IMAGES if colour else GREY_IMAGES):
        gt = _crop(read_image(eabench_data / rel), size)
        noise = sigma / 255 * np.random.default_rng(i).standard_normal(gt.shape)
        noisy = gt + torch.from_numpy(noise.astype(np.float32))
        with torch.no_grad():
            out = model(noisy, sigma=sigma) if getattr(model, "takes_noise_level", False) else model(noisy)
        assert out.shape == gt.shape
        assert _psnr_uint8(out, gt) == pytest.approx(REFERENCE_PSNR[name][i], abs=0.01), (name, rel)


def test_corrupt_and_truncated_files_are_named_errors(mat_dir, tmp_path):
    source = mat_dir / get("dncnn_s_sigma25").file
    data = source.read_bytes()
    truncated = tmp_path / "truncated.mat"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"\x00not a MATLAB file" * 100)
    v5 = tmp_path / "v5.mat"
    v5.write_bytes(b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + b" " * 100)
    model = hm.create("dncnn_gray17")
    for path, pattern in ((truncated, "corrupt or truncated"), (garbage, "corrupt or truncated"),
                          (v5, "MATLAB v5 file"), (tmp_path / "missing.mat", "not found")):
        with pytest.raises(MatConvNetError, match=pattern) as err:
            load_weights(model, path)
        assert str(path) in str(err.value)
    assert issubclass(MatConvNetError, CheckpointError)


@pytest.mark.parametrize("name, preset, pattern", [
    ("dncnn_s_sigma25", "dncnn_gray20", "17 conv layers but DnCNN has 20"),
    ("fdncnn_gray", "dncnn_gray20", "takes a noise-level map"),
    ("dncnn_b_gray_blind", "fdncnn_gray", "takes no noise-level map"),
    ("cdncnn_b_color_blind", "dncnn_gray20", "shape mismatches"),
    ("ffdnet_gray", "fdncnn_gray", "15 conv layers but FDnCNN has 20"),
])
def test_wrong_architecture_is_a_named_error(name, preset, pattern, mat_dir):
    model = hm.create(preset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=pattern):
        load_weights(model, mat_dir / get(name).file)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_copied_file_keeps_its_identity(mat_dir, tmp_path):
    """A renamed copy is still recognised by content (sha256), not by file name."""
    copy = tmp_path / "my_weights.mat"
    shutil.copy(mat_dir / get("fdncnn_color").file, copy)
    info = load_weights(hm.create("fdncnn_color"), copy)
    assert info["registered"] == "fdncnn_color" and info["sha256"] == get("fdncnn_color").sha256


@pytest.mark.parametrize("preset", ["fdncnn_gray", "fdncnn_color", "ffdnet_gray", "ffdnet_color"])
def test_noise_level_models_take_sigma_from_the_task(preset):
    """The preset reads the task's σ when composed with it; alone it has none and says so."""
    conf = MODEL_DIR.parent
    cfg = OmegaConf.create({"model": OmegaConf.load(conf / "model" / f"{preset}.yaml"),
                            "task": OmegaConf.load(conf / "task" / "denoise_gray25.yaml")})
    assert OmegaConf.to_container(cfg, resolve=True)["model"]["noise_level"] == 25
    cfg.task.degradation = {"name": "gaussian_noise", "sigma": 50}
    model = hm.build(OmegaConf.to_container(cfg, resolve=True)["model"])
    assert model.noise_level == 50
    standalone = hm.create(preset)
    assert standalone.noise_level is None
    x = torch.rand(1, standalone.in_nc, 8, 8)
    with pytest.raises(ValueError, match="needs the noise level"):
        standalone(x)
    with torch.no_grad():  # per-call σ wins over the attribute; a σ map of the matching size works
        model.eval()
        at_50 = model(x)
        assert torch.equal(model(x, sigma=50), at_50)
        assert not torch.equal(model(x, sigma=10), at_50)
        size = (4, 4) if preset.startswith("ffdnet") else (8, 8)
        assert torch.allclose(model(x, sigma=torch.full((1, 1, *size), 50.0)), at_50)
    with pytest.raises(ValueError, match="sigma must be"):
        model(x, sigma=torch.ones(3, 2))


def test_fetch_weights_verifies_sha256(loopback_server, mat_dir, tmp_path):
    """harness.weights.fetch through a loopback mirror of the weights folder; a corrupt copy is refused."""
    from harness.data.fetch import ChecksumError, OfflineError
    from harness.weights import fetch

    path = fetch("ffdnet_gray", tmp_path / "ok", mirror=loopback_server(mat_dir))
    assert path.read_bytes() == (mat_dir / "ffdnet_gray.mat").read_bytes()
    bad = tmp_path / "bad_mirror"
    bad.mkdir()
    (bad / "ffdnet_gray.mat").write_bytes((mat_dir / "ffdnet_gray.mat").read_bytes()[:-1])
    with pytest.raises(ChecksumError, match="ffdnet_gray.mat has sha256"):
        fetch("ffdnet_gray", tmp_path / "bad", mirror=loopback_server(bad))
    assert not (tmp_path / "bad" / "ffdnet_gray.mat").exists()
    with pytest.raises(OfflineError, match="place https://raw.githubusercontent.com/cszn/FFDNet/"):
        fetch("ffdnet_color", tmp_path / "off", mirror="http://127.0.0.1:9", timeout=2)


@pytest.mark.parametrize("preset", ["fdncnn_gray", "fdncnn_color", "ffdnet_gray", "ffdnet_color"])
def test_noise_level_models_train_at_odd_sizes(preset):
    """Small widths of the same classes: output size equals input size (odd sizes too), gradients flow."""
    model = hm.create(preset, nc=8, nb=3, noise_level=20)
    x = torch.rand(2, model.in_nc, 9, 7, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["dncnn_s_sigma25", "ffdnet_gray"])
def test_channels_last_evaluation_equals_contiguous(name, mat_dir, eabench_data):
    """meta.channels_last (NHWC convolutions in evaluate) changes speed, not the scores."""
    from harness.evaluate import evaluate

    model = _loaded(name, mat_dir)
    assert model.eabench_meta["channels_last"] is True
    if getattr(model, "takes_noise_level", False):
        model.noise_level = 25
    images = []
    for i, (rel, size) in enumerate(GREY_IMAGES):
        gt = _crop(read_image(eabench_data / rel), size)[0]
        noise = 25 / 255 * torch.from_numpy(np.random.default_rng(i).standard_normal(gt.shape).astype(np.float32))
        images.append({"lq": gt + noise, "gt": gt, "name": rel})
    runs = [evaluate(copy.deepcopy(model), images, channels_last=cl, score_input=False)["results"] for cl in (False, True)]
    for metric in ("psnr", "ssim"):
        assert runs[1][metric].values == pytest.approx(runs[0][metric].values, abs=1e-6), metric
