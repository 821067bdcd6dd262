"""Data: MATLAB bicubic resize, degradations, embedded set, folder readers and their errors,
training sampling, evaluation helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import (
    EMBEDDED_SPLITS,
    DatasetError,
    EmbeddedDataset,
    ImageReadError,
    ListFileDataset,
    PairedFolderDataset,
    PatchDataset,
    ProgressiveBatchSampler,
    ProgressiveSchedule,
    RestorationDataset,
    Sample,
    SIDDValidationDataset,
    SingleFolderDataset,
    augment_8,
    collate_items,
    derive_seed,
    gaussian_kernel,
    imresize,
    inverse_augment_8,
    make_degradation,
    modcrop,
    motion_kernel,
    open_benchmark,
    pad_to_multiple,
    read_image,
    reflect_pad,
    restore,
    self_ensemble,
    tiled_forward,
)
from harness.data.imresize import contributions


def rand_img(h, w, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, c)).astype(np.float32)


def save_png(path: Path, arr: np.ndarray) -> Path:
    a = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(path)
    return path


# -- MATLAB imresize ---------------------------------------------------------------------------

def test_imresize_hand_case_downscale_by_2():
    """1-D [0, 0, 1, 1] at scale 1/2, worked by hand from MATLAB's definition.

    Output 1: u = 1/0.5 + 0.5 (1 - 2) = 1.5; antialiased kernel h(x) = 0.5 cubic(x/2) on input
    pixels -2..5 (1-based), distances 3.5..-3.5 -> cubic(1.75, 1.25, 0.75, 0.25, 0.25, 0.75,
    1.25, 1.75) = (-0.0234375, -0.0703125, 0.2265625, 0.8671875, ...), sum 2 before the 0.5
    factor -> normalised weights w/2. Symmetric mirroring maps pixels -2, -1, 0 to 3, 2, 1 and 5
    to 4, so out1 = 0.546875 a + 0.3984375 b + 0.1015625 c - 0.046875 d; out2 mirrors it.
    """
    s = np.array([0.0, 0.0, 1.0, 1.0])
    col = imresize(s[:, None], 0.5)
    np.testing.assert_allclose(col[:, 0], [0.1015625 - 0.046875, 0.546875 + 0.3984375], atol=1e-15)
    row = imresize(s[None, :], 0.5)  # the same along the other axis
    np.testing.assert_allclose(row[0], [0.0546875, 0.9453125], atol=1e-15)
    w, idx = contributions(4, 2, 0.5)
    np.testing.assert_allclose(w[0] * 2, [-0.0234375, -0.0703125, 0.2265625, 0.8671875,
                                          0.8671875, 0.2265625, -0.0703125, -0.0234375])
    np.testing.assert_array_equal(idx[0], [2, 1, 0, 0, 1, 2, 3, 3])  # 0-based mirrored indices


def test_imresize_hand_case_upscale_by_2():
    # u = x/2 + 0.25: output 1 at u = 0.75 -> taps (0, 1, 1, 2 after mirroring [1 2 2 1]) with
    # cubic(1.75)=-0.0234375, cubic(0.75)=0.2265625, cubic(0.25)=0.8671875, cubic(1.25)=-0.0703125.
    out = imresize(np.array([[0.0, 1.0]]), 2.0)
    np.testing.assert_allclose(out[0], [-0.09375, 0.203125, 0.796875, 1.09375], atol=1e-15)
    assert out.shape == (2, 4)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_constant_stays_constant(scale):
    img = np.full((5 * scale + 1, 7 * scale, 3), 0.37)
    out = imresize(img, 1 / scale)
    assert out.shape == (math.ceil((5 * scale + 1) / scale), 7, 3)
    np.testing.assert_allclose(out, 0.37, atol=1e-13)


def test_imresize_identity_and_linear_ramp():
    img = rand_img(9, 13).astype(np.float64)
    np.testing.assert_allclose(imresize(img, 1.0), img, atol=1e-14)
    # The symmetric, normalised kernel reproduces linear functions away from the borders, and
    # MATLAB's coordinate map puts 0-based output i at input 2 i + 0.5 for scale 1/2.
    ramp = np.arange(40, dtype=np.float64)[:, None]
    out = imresize(ramp, 0.5)[:, 0]
    i = np.arange(4, 16)
    np.testing.assert_allclose(out[i], 2 * i + 0.5, atol=1e-12)


def test_modcrop():
    assert modcrop(np.zeros((10, 13, 3)), 4).shape == (8, 12, 3)


# -- degradations ------------------------------------------------------------------------------

def test_gaussian_noise_seeded_unclipped_recorded():
    gt = np.zeros((64, 64, 3), np.float32)
    deg = make_degradation("gaussian_noise", sigma=25)
    lq, rec = deg(gt, seed=7)
    lq2, _ = deg(gt, seed=7)
    lq3, _ = deg(gt, seed=8)
    np.testing.assert_array_equal(lq, lq2)
    assert not np.array_equal(lq, lq3)
    assert lq.min() < 0  # not clipped
    assert abs(lq.std() - 25 / 255) < 0.05 * 25 / 255
    assert rec == {"name": "gaussian_noise", "params": {"sigma": 25.0, "clip": False}, "sampled": {"sigma": 25.0},
                   "seed": 7}
    json.dumps(rec)
    grey, _ = deg(np.zeros((8, 8, 1), np.float32), seed=1)
    assert grey.shape == (8, 8, 1)


def test_blind_noise_draws_sigma_per_seed():
    deg = make_degradation({"name": "blind_gaussian_noise"})
    sigmas = {deg(np.zeros((4, 4, 3), np.float32), seed=s)[1]["sampled"]["sigma"] for s in range(20)}
    assert len(sigmas) == 20 and all(0 <= s <= 50 for s in sigmas)
    gt = np.full((128, 128, 1), 0.5, np.float32)
    lq, rec = deg(gt, seed=3)
    assert abs((lq - gt).std() - rec["sampled"]["sigma"] / 255) < 0.05 * rec["sampled"]["sigma"] / 255 + 1e-3


def test_bicubic_down_requires_multiple_and_quantises():
    deg = make_degradation("bicubic_down", scale=4)
    assert deg.scale == 4
    with pytest.raises(ValueError, match="not a multiple of scale 4"):
        deg(rand_img(10, 12), seed=0)
    lq, rec = deg(rand_img(16, 12), seed=0)
    assert lq.shape == (4, 3, 3)
    np.testing.assert_allclose(lq * 255, np.round(lq * 255), atol=1e-4)
    assert rec["params"] == {"scale": 4, "quantize": True}


def test_gaussian_and_motion_blur():
    k = gaussian_kernel(2.0)
    assert k.shape == (13, 13) and k.sum() == pytest.approx(1.0) and np.allclose(k, k.T)
    m = motion_kernel(9, 0.0)
    assert m.sum() == pytest.approx(1.0)
    assert np.count_nonzero(m.sum(axis=1)) == 1  # horizontal motion: only the centre row
    const = np.full((20, 24, 3), 0.6, np.float32)
    for spec in ({"name": "gaussian_blur", "sigma": 1.5}, {"name": "motion_blur", "length": 11}):
        deg = make_degradation(spec)
        lq, rec = deg(const, seed=5)
        np.testing.assert_allclose(lq, 0.6, atol=1e-6)
    _, rec = make_degradation("motion_blur", length=11)(const, seed=5)
    assert 0 <= rec["sampled"]["angle"] < 180
    edge = np.zeros((21, 21, 1), np.float32)
    edge[:, 10:] = 1.0
    lq, _ = make_degradation("gaussian_blur", sigma=2.0)(edge, seed=0)
    assert 0 < lq[10, 9, 0] < 0.5 < lq[10, 10, 0] < 1  # edge smeared, symmetric about it


def test_haze_scattering_model():
    deg = make_degradation("haze", beta=1.2, airlight=0.8)
    # J == A is a fixed point of I = J t + A (1 - t), whatever the depth map.
    lq, rec = deg(np.full((40, 30, 3), 0.8, np.float32), seed=3)
    np.testing.assert_allclose(lq, 0.8, atol=1e-6)
    # J = 0 gives I = A (1 - t), t = exp(-beta * depth) with depth in [0, 1].
    lq, rec = deg(np.zeros((40, 30, 3), np.float32), seed=3)
    t = 1 - lq[..., 0] / 0.8
    assert t.min() == pytest.approx(math.exp(-1.2), abs=1e-5) and t.max() == pytest.approx(1.0, abs=1e-6)
    assert np.abs(np.diff(t, axis=0)).max() < 0.2 and np.abs(np.diff(t, axis=1)).max() < 0.2  # smooth
    assert rec["sampled"]["beta"] == 1.2 and rec["sampled"]["airlight"] == 0.8
    _, drawn = make_degradation("haze")(np.zeros((8, 8, 3), np.float32), seed=1)
    assert 0.6 <= drawn["sampled"]["beta"] <= 1.8 and 0.7 <= drawn["sampled"]["airlight"] <= 1.0


def test_chain_and_registry_errors():
    deg = make_degradation("chain", steps=[{"name": "gaussian_blur", "sigma": 1.0},
                                           {"name": "gaussian_noise", "sigma": 10}])
    lq, rec = deg(rand_img(16, 16), seed=2)
    assert [s["name"] for s in rec["sampled"]["steps"]] == ["gaussian_blur", "gaussian_noise"]
    json.dumps(rec)
    with pytest.raises(KeyError, match="unknown degradation 'jpeg_xl'.*gaussian_noise"):
        make_degradation("jpeg_xl")
    with pytest.raises(TypeError, match="bad parameters"):
        make_degradation("gaussian_noise", sgima=3)


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, "astronaut") == derive_seed(0, "astronaut")
    seeds = {derive_seed(0, n) for n in EMBEDDED_SPLITS["all"]}
    assert len(seeds) == len(EMBEDDED_SPLITS["all"]) and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(1, "astronaut") != derive_seed(0, "astronaut")


# -- embedded dataset --------------------------------------------------------------------------

def test_embedded_split_is_fixed_and_disjoint():
    tr, va, te = (set(EMBEDDED_SPLITS[k]) for k in ("train", "val", "test"))
    assert not (tr & va or tr & te or va & te)
    assert len(tr | va | te) == 11
    assert EMBEDDED_SPLITS["test"] == ("astronaut", "chelsea", "grace_hopper")
    assert {"motorcycle_left", "motorcycle_right"} <= tr  # stereo views never straddle splits


def test_embedded_test_split_with_noise():
    ds = EmbeddedDataset("test", degradation={"name": "gaussian_noise", "sigma": 50}, seed=0)
    assert len(ds) == 3 and ds.names == ["astronaut", "chelsea", "grace_hopper"]
    item = ds[0]
    assert item["gt"].shape == (3, 512, 512) and item["lq"].shape == (3, 512, 512)
    assert item["name"] == "astronaut" and item["degradation"]["seed"] == derive_seed(0, "astronaut")
    assert item["gt"].min() >= 0 and item["gt"].max() <= 1 and item["lq"].min() < 0
    assert torch.equal(ds[0]["lq"], item["lq"])  # reproducible
    assert ds[1]["gt"].shape == (3, 300, 451) and ds[2]["gt"].shape == (3, 600, 512)
    d = ds.describe()
    assert d["degradation"] == {"name": "gaussian_noise", "sigma": 50.0, "clip": False}
    assert set(d["pixel_sha256"]) == set(ds.names)


def test_embedded_grey_crop_and_sr():
    ds = EmbeddedDataset("val", grey=True, crop=64, degradation="identity")
    g = ds[0]["gt"]
    assert g.shape == (1, 64, 64)
    np.testing.assert_allclose(g * 255, torch.round(g * 255), atol=1e-4)  # 8-bit grey levels
    sr = EmbeddedDataset("test", degradation={"name": "bicubic_down", "scale": 3}, names=["chelsea"])
    item = sr[0]
    assert item["gt"].shape == (3, 300, 450) and item["lq"].shape == (3, 100, 150)  # modcropped
    assert sr.scale == 3
    with pytest.raises(KeyError, match="unknown embedded split"):
        EmbeddedDataset("holdout")


# -- folders -----------------------------------------------------------------------------------

@pytest.fixture()
def sr_folders(tmp_path):
    gt_dir, lq_dir = tmp_path / "HR", tmp_path / "LR" / "X4"
    gt_dir.mkdir()
    lq_dir.mkdir(parents=True)
    for i, name in enumerate(["0801", "0802"]):
        gt = rand_img(32, 24, seed=i)
        save_png(gt_dir / f"{name}.png", gt)
        save_png(lq_dir / f"{name}x4.png", gt[::4, ::4])
    return lq_dir, gt_dir


def test_paired_folder_template(sr_folders):
    lq_dir, gt_dir = sr_folders
    ds = PairedFolderDataset(lq_dir, gt_dir, scale=4, lq_template="{}x4", check_sizes=True)
    assert ds.names == ["0801", "0802"] and ds.scale == 4
    item = ds[1]
    assert item["lq"].shape == (3, 8, 6) and item["gt"].shape == (3, 32, 24)
    assert item["degradation"]["sampled"]["lq_file"] == "0802x4.png"
    batch = collate_items([ds[0], ds[1]])
    assert batch["lq"].shape == (2, 3, 8, 6) and batch["name"] == ["0801", "0802"]


def test_paired_folder_errors_name_the_file(sr_folders, tmp_path):
    lq_dir, gt_dir = sr_folders
    with pytest.raises(FileNotFoundError, match="LQ folder not found: .*nope"):
        PairedFolderDataset(tmp_path / "nope", gt_dir, scale=4, lq_template="{}x4")
    with pytest.raises(DatasetError, match=r"0801\.png -> 0801\.\*"):
        PairedFolderDataset(lq_dir, gt_dir, scale=4)  # wrong template
    msg = r"size mismatch for scale 2: LQ .*0801x4\.png is 8x6, GT .*0801\.png is 32x24"
    with pytest.raises(DatasetError, match=msg):
        PairedFolderDataset(lq_dir, gt_dir, scale=2, lq_template="{}x4")[0]
    (gt_dir / "0803.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    save_png(lq_dir / "0803x4.png", rand_img(8, 6))
    ds = PairedFolderDataset(lq_dir, gt_dir, scale=4, lq_template="{}x4")
    with pytest.raises(ImageReadError, match=r"0803\.png"):
        ds[2]


def test_paired_folder_channel_mismatch_and_gt_slack(tmp_path):
    gt_dir, lq_dir = tmp_path / "gt", tmp_path / "lq"
    gt_dir.mkdir()
    lq_dir.mkdir()
    save_png(gt_dir / "a.png", rand_img(18, 18))  # 18 = 2 * 8 + 2: GT slack below the scale
    save_png(lq_dir / "a.png", rand_img(6, 6, c=1))
    with pytest.raises(DatasetError, match=r"channel mismatch: LQ .*a\.png has 1 channel\(s\), GT .*a\.png has 3"):
        PairedFolderDataset(lq_dir, gt_dir, scale=3)[0]
    ds = PairedFolderDataset(lq_dir, gt_dir, scale=3, channels="rgb")
    assert ds[0]["gt"].shape == (3, 18, 18)
    save_png(lq_dir / "a.png", rand_img(4, 4))  # 18 = 4 * 4 + 2: HR not modcropped -> GT cropped
    assert PairedFolderDataset(lq_dir, gt_dir, scale=4)[0]["gt"].shape == (3, 16, 16)
    save_png(lq_dir / "a.png", rand_img(5, 5))  # 18 = 3 * 5 + 3: a whole LR pixel off -> error
    with pytest.raises(DatasetError, match="size mismatch for scale 3"):
        PairedFolderDataset(lq_dir, gt_dir, scale=3)[0]


def test_single_folder_layouts_and_tif(tmp_path):
    root = tmp_path / "test"
    (root / "CBSD68").mkdir(parents=True)
    (root / "McMaster").mkdir()
    for i in range(2):
        save_png(root / "CBSD68" / f"{i:04d}.png", rand_img(20, 16, seed=i))
        a = (rand_img(20, 16, seed=9 + i) * 255).astype(np.uint8)
        Image.fromarray(a).save(root / "McMaster" / f"{i + 1}.tif")
    noise = {"name": "gaussian_noise", "sigma": 15}
    ds = open_benchmark(root, "CBSD68", degradation=noise, seed=0)
    assert isinstance(ds, SingleFolderDataset) and len(ds) == 2
    assert ds[0]["degradation"]["params"]["sigma"] == 15.0
    mc = open_benchmark(root, "McMaster", degradation=noise)
    assert mc[1]["gt"].shape == (3, 20, 16) and mc.names == ["1", "2"]
    grey = SingleFolderDataset(root / "CBSD68", noise, grey=True)
    assert grey[0]["gt"].shape == (1, 20, 16)
    with pytest.raises(FileNotFoundError, match=r"Kodak24 clean images: .*tried .*Kodak24"):
        open_benchmark(root, "Kodak24", degradation=noise)
    with pytest.raises(FileNotFoundError, match="image folder not found: .*missing"):
        SingleFolderDataset(tmp_path / "missing", noise)


def test_open_benchmark_sr_layouts(tmp_path):
    hr = tmp_path / "Set5" / "HR"
    lr = tmp_path / "Set5" / "LR_bicubic" / "X2"
    hr.mkdir(parents=True)
    lr.mkdir(parents=True)
    gt = rand_img(16, 12)
    save_png(hr / "baby.png", gt)
    save_png(lr / "babyx2.png", gt[::2, ::2])
    ds = open_benchmark(tmp_path, "Set5", scale=2)
    assert isinstance(ds, PairedFolderDataset) and ds[0]["lq"].shape == (3, 8, 6)
    synth = open_benchmark(tmp_path, "Set5", scale=4)  # no X4 folder: MATLAB bicubic synthesised
    assert synth[0]["lq"].shape == (3, 4, 3) and synth[0]["degradation"]["name"] == "bicubic_down"


def test_list_files(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("a", "b"):
        save_png(tmp_path / "img" / f"{n}_gt.png", rand_img(8, 8))
        save_png(tmp_path / "img" / f"{n}_lq.png", rand_img(8, 8, seed=5))
    (tmp_path / "gt.txt").write_text("# comment\nimg/a_gt.png\nimg/b_gt.png\n")
    (tmp_path / "lq.txt").write_text("img/a_lq.png\n\nimg/b_lq.png\n")
    (tmp_path / "pairs.txt").write_text("img/a_lq.png img/a_gt.png\nimg/b_lq.png img/b_gt.png\n")
    two = ListFileDataset(tmp_path / "gt.txt", tmp_path / "lq.txt")
    one = ListFileDataset(tmp_path / "pairs.txt")
    assert two.names == ["a_gt", "b_gt"] and len(one) == 2
    assert torch.equal(two[1]["lq"], one[1]["lq"]) and torch.equal(two[1]["gt"], one[1]["gt"])
    clean = ListFileDataset(tmp_path / "gt.txt", degradation="gaussian_noise")
    assert clean[0]["degradation"]["name"] == "gaussian_noise"
    (tmp_path / "short.txt").write_text("img/a_lq.png\n")
    with pytest.raises(DatasetError, match="differ in length"):
        ListFileDataset(tmp_path / "gt.txt", tmp_path / "short.txt")
    (tmp_path / "bad.txt").write_text("img/missing.png\n")
    with pytest.raises(ImageReadError, match="missing.png"):
        ListFileDataset(tmp_path / "bad.txt", degradation="identity")[0]


def test_sidd_mat_blocks(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    gt = rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt})
    ds = open_benchmark(tmp_path, "SIDD")
    assert isinstance(ds, SIDDValidationDataset) and len(ds) == 6 and ds.names[4] == "01_01"
    item = ds[4]
    np.testing.assert_allclose(item["lq"].permute(1, 2, 0).numpy() * 255, noisy[1, 1], atol=1e-4)
    np.testing.assert_allclose(item["gt"].permute(1, 2, 0).numpy() * 255, gt[1, 1], atol=1e-4)
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"Other": gt})
    msg = r"ValidationGtBlocksSrgb\.mat has no variable 'ValidationGtBlocksSrgb' \(found \['Other'\]\)"
    with pytest.raises(DatasetError, match=msg):
        SIDDValidationDataset(tmp_path)
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt[:1]})
    with pytest.raises(DatasetError, match="differ"):
        SIDDValidationDataset(tmp_path)


def test_read_image_16bit_and_missing(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(a).save(tmp_path / "d.png")
    img = read_image(tmp_path / "d.png")
    assert img.shape == (8, 8, 1) and img.dtype == np.float32
    assert img[0, 1, 0] == pytest.approx(1000 / 65535)
    with pytest.raises(ImageReadError, match="not found: .*nothere.png"):
        read_image(tmp_path / "nothere.png")


# -- training sampling -------------------------------------------------------------------------

class ArrayPairs(RestorationDataset):
    """In-memory stored pairs for sampling tests."""

    def __init__(self, pairs, scale=1):
        super().__init__()
        self.pairs, self._scale = pairs, scale

    @property
    def scale(self):
        return self._scale

    @property
    def names(self):
        return [f"img{i}" for i in range(len(self.pairs))]

    def _load(self, i):
        lq, gt = self.pairs[i]
        return Sample(name=f"img{i}", gt=gt, lq=lq)


def test_patch_alignment_for_sr():
    gt = rand_img(64, 48)
    ds = PatchDataset(ArrayPairs([(gt[::4, ::4].copy(), gt)], scale=4), patch_size=16, augment=False, seed=1)
    for k in range(5):
        item = ds[k]
        assert item["lq"].shape == (3, 4, 4) and item["gt"].shape == (3, 16, 16)
        assert torch.equal(item["lq"], item["gt"][:, ::4, ::4])
        s = item["sample"]
        assert torch.equal(item["gt"], torch.from_numpy(gt).permute(2, 0, 1)[:, s["top"] * 4: s["top"] * 4 + 16,
                                                                               s["left"] * 4: s["left"] * 4 + 16])


def test_patch_augmentation_applied_to_both_and_reproducible():
    gt = rand_img(40, 40)
    ds = PatchDataset(ArrayPairs([(gt + 0.25, gt)]), patch_size=24, augment=True, seed=3)
    augs = set()
    for k in range(40):
        item = ds[k]
        np.testing.assert_allclose((item["lq"] - item["gt"]).numpy(), 0.25, atol=1e-6)
        augs.add(item["sample"]["aug"])
    assert augs == set(range(8))
    assert torch.equal(ds[5]["gt"], ds[5]["gt"])
    assert not torch.equal(ds[(0, 24, 100)]["gt"], ds[(0, 24, 101)]["gt"])


def test_augment_8_distinct_and_invertible():
    x = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    outs = [augment_8(x, k) for k in range(8)]
    assert len({o.tobytes() + bytes(o.shape) for o in outs}) == 8
    for k in range(8):
        np.testing.assert_array_equal(inverse_augment_8(outs[k], k), x)
        t = torch.from_numpy(x).permute(2, 0, 1)
        np.testing.assert_array_equal(augment_8(t, k).permute(1, 2, 0).numpy(), outs[k])


def test_reflect_pad_small_images():
    x = np.arange(3, dtype=np.float32).reshape(1, 3, 1)
    np.testing.assert_array_equal(reflect_pad(x, 0, 2)[0, :, 0], [0, 1, 2, 1, 0])
    np.testing.assert_array_equal(reflect_pad(x, 0, 5)[0, :, 0], [0, 1, 2, 1, 0, 1, 2, 1])  # twice
    ds = PatchDataset(ArrayPairs([(rand_img(10, 12), rand_img(10, 12))]), patch_size=32, augment=False)
    item = ds[0]
    assert item["gt"].shape == (3, 32, 32) and item["sample"]["pad"] == [22, 20]


def test_online_blind_noise_fresh_per_sample():
    base = EmbeddedDataset("val", crop=64)
    ds = PatchDataset(base, patch_size=32, online_degradation="blind_gaussian_noise", repeat=4, seed=0)
    a, b = ds[0], ds[2]
    assert a["degradation"]["name"] == "blind_gaussian_noise"
    assert a["degradation"]["sampled"]["sigma"] != b["degradation"]["sampled"]["sigma"]
    assert torch.equal(ds[0]["lq"], a["lq"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["lq"], a["lq"])


def test_progressive_schedule_and_sampler():
    sched = ProgressiveSchedule(iters=[3, 2], patch_sizes=[16, 24], batch_sizes=[4, 2])
    assert [sched.at(i) for i in (0, 2, 3, 4, 99)] == [(16, 4), (16, 4), (24, 2), (24, 2), (24, 2)]
    sampler = ProgressiveBatchSampler(sched, num_images=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert [len(b) for b in batches] == [4, 4, 4, 2, 2] and batches[3][0][1] == 24
    ids = [k[2] for b in batches for k in b]
    assert ids == list(range(16))
    resumed = list(ProgressiveBatchSampler(sched, num_images=2, seed=0, start_iter=3))
    assert resumed == batches[3:]
    base = EmbeddedDataset("val", crop=48)
    ds = PatchDataset(base, patch_size=16, online_degradation={"name": "gaussian_noise", "sigma": 25})
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_items)
    shapes = [tuple(b["gt"].shape) for b in loader]
    assert shapes == [(4, 3, 16, 16)] * 3 + [(2, 3, 24, 24)] * 2
    with pytest.raises(ValueError, match="equal non-empty"):
        ProgressiveSchedule([1], [16, 32], [1])


# -- evaluation helpers ------------------------------------------------------------------------

def test_pad_to_multiple_and_restore_identity():
    x = torch.rand(1, 3, 13, 21)
    xp, size = pad_to_multiple(x, 8)
    assert xp.shape == (1, 3, 16, 24) and size == (13, 21)
    assert torch.equal(xp[..., 13, :21], x[..., 11, :])  # reflect without repeating the edge
    seen = []

    def model(t):
        seen.append(tuple(t.shape[-2:]))
        return t * 2 + 1

    out = restore(model, x, multiple=8)
    assert seen == [(16, 24)] and torch.allclose(out, x * 2 + 1)
    tiny, _ = pad_to_multiple(torch.rand(1, 1, 3, 3), 16)  # pad larger than the image
    assert tiny.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
def test_tiled_forward_matches_full_pass(blend):
    x = torch.rand(2, 3, 70, 45)
    sr = lambda t: (t * 2).repeat_interleave(2, -2).repeat_interleave(2, -1)  # noqa: E731
    full = sr(x)
    tiled = tiled_forward(sr, x, tile=32, overlap=8, scale=2, multiple=8, blend=blend)
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-5)


def test_self_ensemble_closed_forms():
    x = torch.rand(1, 1, 12, 12)
    pointwise = lambda t: t**2  # noqa: E731
    for mode in ("x8", "flip4"):
        torch.testing.assert_close(self_ensemble(pointwise, x, mode), x**2)
    shift = lambda t: torch.roll(t, 1, dims=-1)  # noqa: E731
    flip4 = (torch.roll(x, 1, -1) + torch.roll(x, -1, -1)) / 2
    torch.testing.assert_close(self_ensemble(shift, x, "flip4"), flip4)
    x8 = (torch.roll(x, 1, -1) + torch.roll(x, -1, -1) + torch.roll(x, 1, -2) + torch.roll(x, -1, -2)) / 4
    torch.testing.assert_close(self_ensemble(shift, x, "x8"), x8)


def test_build_dataset_from_config(tmp_path):
    from harness.data import build_dataset

    ds = build_dataset({"kind": "embedded", "split": "test", "crop": 32,
                        "degradation": {"name": "chain", "steps": [{"name": "gaussian_blur", "sigma": 1.0},
                                                                   {"name": "gaussian_noise", "sigma": 5}]}})
    assert len(ds) == 3 and ds[0]["lq"].shape == (3, 32, 32)
    json.dumps(ds.describe())
    with pytest.raises(KeyError, match="unknown dataset kind 'zip'"):
        build_dataset({"kind": "zip"})
    with pytest.raises(TypeError, match="bad arguments for dataset kind 'embedded'"):
        build_dataset({"kind": "embedded", "splt": "test"})
