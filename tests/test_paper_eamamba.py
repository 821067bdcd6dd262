"""experiment=paper_eamamba without the real files: release-container checkpoints from random
weights, tiny datasets in each of the release's layouts, and every cell checked against values
computed by hand (an EAMamba whose output convolution is zero returns its input exactly, so each
cell's PSNR/SSIM follows from the stored pairs alone)."""

from __future__ import annotations

import csv
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from omegaconf import OmegaConf
from PIL import Image

import harness.models as hm
from harness.checkpoints import CheckpointError
from harness.data.release_sets import (
    DPDD_INDOOR_TARGETS,
    RELEASE_SETS,
    ReleaseTestSet,
    missing_files,
    read_uint8_rgb,
    release_noise,
)
from harness.metrics.matlab import matlab_psnr, matlab_ssim
from harness.ops import use_backend
from harness.release_eval import forward_quadrants, load_release_weights, score
from harness.release_table import run_release_table_job

CONF = Path(__file__).resolve().parents[1] / "conf"
FIXTURES = Path(__file__).parent / "fixtures" / "state_dicts"
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

# The release README's numbers (issue 21): (dataset, task) -> (psnr, ssim).
PUBLISHED = {
    ("RealSR-x2", "realsr_x2"): (34.18, 0.927), ("RealSR-x3", "realsr_x3"): (31.11, 0.872),
    ("RealSR-x4", "realsr_x4"): (29.60, 0.835),
    ("Urban100", "denoise_gauss15"): (35.10, None), ("Urban100", "denoise_gauss25"): (32.93, None),
    ("Urban100", "denoise_gauss50"): (30.01, None), ("CBSD68", "denoise_gauss15"): (34.43, None),
    ("CBSD68", "denoise_gauss25"): (31.81, None), ("CBSD68", "denoise_gauss50"): (28.62, None),
    ("Kodak24", "denoise_gauss15"): (35.36, None), ("Kodak24", "denoise_gauss25"): (32.95, None),
    ("Kodak24", "denoise_gauss50"): (29.91, None), ("McMaster", "denoise_gauss15"): (35.59, None),
    ("McMaster", "denoise_gauss25"): (33.34, None), ("McMaster", "denoise_gauss50"): (30.31, None),
    ("SIDD", "denoise_real"): (39.87, 0.960), ("GoPro", "deblur_motion"): (33.58, 0.966),
    ("HIDE", "deblur_motion"): (31.42, 0.944), ("SOTS-indoor", "dehaze"): (43.19, 0.995),
    ("SOTS-outdoor", "dehaze"): (36.34, 0.988), ("DPDD-indoor", "deblur_defocus"): (28.90, 0.887),
    ("DPDD-outdoor", "deblur_defocus"): (23.23, 0.785), ("DPDD", "deblur_defocus"): (25.99, 0.821),
}


def const_ssim(a: float, b: float) -> float:
    """SSIM of two constant images (any window): only the luminance term is left."""
    return (2 * a * b + C1) / (a * a + b * b + C1)


def psnr_of(d: float) -> float:
    return 20 * math.log10(255 / d)


def table_config(model: str | None = None):
    table = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / "paper_eamamba.yaml"))["table"]
    if model:
        for section in table["sections"]:
            section["model"] = model
    return table


# -- files in the release's layouts -------------------------------------------------------------

def write_png16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG (what DPDD ships; Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_const(path: Path, value, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)


def make_release_tree(root: Path) -> dict:
    """Tiny versions of every set; returns each cell's hand-computed (psnr, ssim) or the clean images."""
    rng = np.random.default_rng(0)
    clean = {}
    for name, rel, ext, size in (("CBSD68", "CBSD68/original_png", "png", (30, 27)), ("Kodak24", "Kodak24", "png", (24, 32)),
                                 ("McMaster", "McMaster", "tif", (32, 21)),
                                 ("Urban100", "SR/benchmark/Urban100/HR", "png", (29, 33))):
        img = rng.integers(40, 216, size=(*size, 3), dtype=np.uint8)
        (root / rel).mkdir(parents=True)
        Image.fromarray(img).save(root / rel / f"img001.{ext}")
        clean[name] = img
    noisy = np.full((1, 2, 32, 32, 3), 120, np.uint8)
    (root / "SIDD/test/SIDD").mkdir(parents=True)
    scipy.io.savemat(root / "SIDD/test/SIDD/ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(root / "SIDD/test/SIDD/ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": noisy * 0 + 100})
    for folder, d in (("GoproTest", 5), ("HideTest", 9)):
        for stem in ("GOPR0384_11_00-000001", "GOPR0384_11_00-000002"):
            write_const(root / folder / "input" / f"{stem}.png", 100 + d)
            write_const(root / folder / "target" / f"{stem}.png", 100)
    for k in (1, 2):
        write_const(root / "RESIDE-standard-ITS/test/hazy" / f"1400_{k}.png", 104)
    write_const(root / "RESIDE-standard-ITS/test/gt/1400.png", 100)
    write_const(root / "SOTS/outdoor/gt/0001.png", 100)
    (root / "SOTS/outdoor/hazy").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "SOTS/outdoor/hazy/0001_0.8_0.2.jpg", quality=95)
    # DPDD: source/target numbers differ by one; 16-bit values whose high bytes are 105 / 100.
    for src, tgt, hi in ((1046, 1045, 107), (917, 916, 103)):  # 1P0A1045 is indoor, 1P0A0916 outdoor
        write_png16(root / f"dd_dp_dataset_png/test_c/source/1P0A{src:04d}.png", np.full((32, 32, 3), hi * 256 + 200))
        write_png16(root / f"dd_dp_dataset_png/test_c/target/1P0A{tgt:04d}.png", np.full((32, 32, 3), 100 * 256 + 255))
    for s in (2, 3, 4):
        for cam in ("Canon", "Nikon"):
            hr = np.zeros((40, 40, 3), np.uint8) + np.array([100, 110, 120], np.uint8)
            folder = root / f"RealSR/{cam}/Test/{s}"
            folder.mkdir(parents=True)
            Image.fromarray(hr).save(folder / f"{cam}_001_HR.png")
            Image.fromarray(hr + s).save(folder / f"{cam}_001_LR{s}.png")
    return clean


def expected_values(clean: dict, root: Path) -> dict:
    """(dataset, sigma) -> (psnr, ssim or None) by hand for an identity model."""
    out = {("GoPro", None): (psnr_of(5), const_ssim(100, 105)), ("HIDE", None): (psnr_of(9), const_ssim(100, 109)),
           ("SOTS-indoor", None): (psnr_of(4), const_ssim(100, 104)), ("SIDD", None): (psnr_of(20), const_ssim(100, 120)),
           ("DPDD-indoor", None): (psnr_of(7), const_ssim(100, 107)), ("DPDD-outdoor", None): (psnr_of(3), const_ssim(100, 103))}
    out[("DPDD", None)] = ((out[("DPDD-indoor", None)][0] + out[("DPDD-outdoor", None)][0]) / 2,
                           (out[("DPDD-indoor", None)][1] + out[("DPDD-outdoor", None)][1]) / 2)
    hazy = np.asarray(Image.open(root / "SOTS/outdoor/hazy/0001_0.8_0.2.jpg").convert("RGB"), np.float64)
    out[("SOTS-outdoor", None)] = (10 * math.log10(255**2 / np.mean((hazy - 100) ** 2)), None)
    for s in (2, 3, 4):  # Y of (100, 110, 120) + s against Y of (100, 110, 120)
        y = 16 + (65.481 * 100 + 128.553 * 110 + 24.966 * 120) / 255
        dy = s * (65.481 + 128.553 + 24.966) / 255
        out[(f"RealSR-x{s}", None)] = (psnr_of(dy), const_ssim(y, y + dy))
    for name, img in clean.items():
        gt = img.astype(np.float64) / 255
        h, w, _ = img.shape
        for sigma in (15, 25, 50):
            torch.manual_seed(2454)  # the release reseeds the global generator for each image
            hp, wp = h + (-h) % 8, w + (-w) % 8
            noise = torch.randn(3, hp, wp).mul_(torch.FloatTensor([sigma]) / 255.0).numpy()
            pred = np.clip(gt + noise[:, :h, :w].transpose(1, 2, 0).astype(np.float64), 0, 1)
            out[(name, sigma)] = (10 * math.log10(1 / np.mean((pred - gt) ** 2)), None)
    return out


def release_container(sd: dict, optimizer_state: dict, identity_key: str):
    """The release's .pth: {'model': {'name', 'args', 'sd', 'sd_e'}, 'optimizer', 'current_iter', 'state'};
    the ``identity_key`` state dict has a zero output convolution (the network returns its input)."""
    ident = {k: v.clone() for k, v in sd.items()}
    ident["output.weight"].zero_()
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    states = {"sd": other, "sd_e": other, identity_key: ident}
    return {"model": {"name": "eamamba", "args": {"inp_channels": 3, "out_channels": 3, "dim": 64,
                                                  "mamba_cfg": {"scan_type": "diagonal", "scan_count": 8}},
                      **states},
            "optimizer": {"name": "AdamW", "args": {"lr": 3e-4}, "sd": optimizer_state},
            "current_iter": 300000, "state": torch.get_rng_state()}


@pytest.fixture
def one_thread():
    """Tiny inputs: one thread is fastest, and two on a shared machine can be many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    data, ckpt = root / "datasets", root / "ckpt"
    clean = make_release_tree(data)
    ckpt.mkdir()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = hm.create("eamamba_tiny")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    with use_backend("torch"):
        model(torch.rand(1, 3, 8, 8)).mean().backward()
    opt.step()  # a state with step counts and moments, as in the release's files
    names = {c.get("weights") or s.get("weights") for s in table_config()["sections"] for c in s["cells"]}
    for name in names:  # SIDD's route loads model/sd, every other route model/sd_e
        torch.save(release_container(sd, opt.state_dict(), "sd" if name.startswith("sidd") else "sd_e"), ckpt / name)
    torch.set_num_threads(threads)
    return {"data": data, "ckpt": ckpt, "expected": expected_values(clean, data)}


# -- metrics and forward ------------------------------------------------------------------------

def brute_matlab_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """MATLAB ssim of (C, H, W) volumes by explicit sums over clamped 11x11x11 neighbourhoods."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()
    c, h, w = x.shape
    vals = []
    for k in range(c):
        for i in range(h):
            for j in range(w):
                ks, is_, js = (np.clip(k + r, 0, c - 1), np.clip(i + r, 0, h - 1), np.clip(j + r, 0, w - 1))
                wgt = g[:, None, None] * g[None, :, None] * g[None, None, :]
                px, py = x[np.ix_(ks, is_, js)], y[np.ix_(ks, is_, js)]
                mx, my = (wgt * px).sum(), (wgt * py).sum()
                sxx, syy = (wgt * px * px).sum() - mx**2, (wgt * py * py).sum() - my**2
                sxy = (wgt * px * py).sum() - mx * my
                vals.append((2 * mx * my + C1) * (2 * sxy + C2) / ((mx**2 + my**2 + C1) * (sxx + syy + C2)))
    return float(np.mean(vals))


def test_matlab_ssim_is_volumetric_and_psnr_pools_channels():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 55, (3, 9, 7)) + np.array([0, 100, 200])[:, None, None]  # channels far apart
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    got = float(matlab_ssim(torch.tensor(x)[None], torch.tensor(y)[None])[0])
    assert got == pytest.approx(brute_matlab_ssim(x, y), abs=1e-12)
    # Not the per-channel mean of 2-D SSIMs: channels blur into each other.
    per_channel = np.mean([brute_matlab_ssim(x[k:k + 1], y[k:k + 1]) for k in range(3)])
    assert got > per_channel + 0.3  # 0.977 against 0.614 here
    a = torch.full((1, 3, 12, 12), 100.0)
    assert float(matlab_ssim(a + 10, a)[0]) == pytest.approx(const_ssim(110, 100), abs=1e-12)
    assert float(matlab_psnr(a + 10, a)[0]) == pytest.approx(psnr_of(10), abs=1e-12)


def test_forward_quadrants_takes_each_corner_from_its_own_chop():
    calls = []

    def model(chop):
        calls.append(tuple(chop.shape[-2:]))
        return chop + 1000 * len(calls)  # chop k (1-based) adds 1000 k

    x = torch.arange(40 * 48, dtype=torch.float32).view(1, 1, 40, 48)
    y = forward_quadrants(model, x, crop_size=2048)
    # h = 40: top rows 0:32 (20 + 16 - 4), bottom rows 8:40; w = 48: left 0:40, right 8:48.
    assert calls == [(32, 40)] * 4
    offsets = torch.zeros(40, 48)
    offsets[:20, :24], offsets[:20, 24:], offsets[20:, :24], offsets[20:, 24:] = 1000, 2000, 3000, 4000
    assert torch.equal(y[0, 0], x[0, 0] + offsets)
    calls.clear()
    # An input of ≥ crop_size² pixels is split and the split recurses: 96² -> 64² -> 48², and only
    # the quadrants of an input below 60² (the 48² ones: 40² chops) reach the model.
    z = torch.zeros(1, 1, 96, 96)
    assert forward_quadrants(model, z, crop_size=60).shape == z.shape
    assert calls == [(40, 40)] * 64


def test_routes_score_by_hand():
    gt = torch.full((1, 3, 32, 32), 100 / 255)
    pred = torch.full((1, 3, 32, 32), 105.4 / 255)
    # test.py: floats, no rounding; MATLAB PNG route: 105.4 -> 105.
    assert score("testpy", pred, gt)["psnr"] == pytest.approx(psnr_of(5.4), abs=1e-5)
    assert score("matlab_uint8", pred, gt)["psnr"] == pytest.approx(psnr_of(5), abs=1e-9)
    assert score("matlab_uint8", pred, gt)["ssim"] == pytest.approx(const_ssim(105, 100), abs=1e-12)
    assert score("matlab_single", pred, gt)["psnr"] == pytest.approx(psnr_of(5.4), abs=1e-5)
    with pytest.raises(ValueError, match="unknown route"):
        score("basicsr", pred, gt)


# -- readers ------------------------------------------------------------------------------------

def test_release_layouts_read_as_the_release_pairs_them(release_files):
    data = release_files["data"]
    assert read_uint8_rgb(data / "dd_dp_dataset_png/test_c/source/1P0A1046.png")[0, 0].tolist() == [107] * 3
    counts = {name: len(ReleaseTestSet(data, name, sigma=25 if spec.kind == "gaussian" else None))
              for name, spec in RELEASE_SETS.items()}
    assert counts == {"CBSD68": 1, "Kodak24": 1, "McMaster": 1, "Urban100": 1, "SIDD": 2, "GoPro": 2, "HIDE": 2,
                      "SOTS-indoor": 2, "SOTS-outdoor": 1, "DPDD-indoor": 1, "DPDD-outdoor": 1, "DPDD": 2,
                      "RealSR-x2": 2, "RealSR-x3": 2, "RealSR-x4": 2}
    assert len(DPDD_INDOOR_TARGETS) == 37 and RELEASE_SETS["DPDD"].expected == 76
    sots = ReleaseTestSet(data, "SOTS-indoor")
    assert [p[0] for p in sots.pairs] == ["1400_1", "1400_2"] and {p[2].name for p in sots.pairs} == {"1400.png"}
    dpdd = ReleaseTestSet(data, "DPDD-indoor")[0]
    assert dpdd["name"] == "1P0A1045" and dpdd["lq"][0, 0, 0] * 255 == pytest.approx(107)
    item = ReleaseTestSet(data, "CBSD68", sigma=15)[0]  # 30x27 -> LQ padded to 32x32 before the noise
    assert item["gt"].shape == (3, 30, 27) and item["lq"].shape == (3, 32, 32)
    torch.manual_seed(2454)
    assert torch.equal(release_noise((3, 32, 32), 15), torch.randn(3, 32, 32).mul_(torch.FloatTensor([15]) / 255.0))


def test_missing_files_and_bad_layouts_are_named(tmp_path):
    assert missing_files(tmp_path, "GoPro") == [str(tmp_path / "GoproTest/input"), str(tmp_path / "GoproTest/target")]
    write_const(tmp_path / "GoproTest/input/a.png", 1)
    write_const(tmp_path / "GoproTest/target/b.png", 1)
    with pytest.raises(ValueError, match="a.png"):
        ReleaseTestSet(tmp_path, "GoPro")
    write_const(tmp_path / "Kodak24/kodim01.png", 1)
    with pytest.raises(ValueError, match="sigma is required"):
        ReleaseTestSet(tmp_path, "Kodak24")
    with pytest.raises(KeyError, match="known"):
        missing_files(tmp_path, "Set5")


# -- checkpoints --------------------------------------------------------------------------------

def test_full_size_preset_loads_the_release_container_strictly(tmp_path):
    """Every cell names the eamamba preset; a release-shaped state dict (keys and shapes listed from
    the official code) loads into it strictly from the release's container."""
    assert {s["model"] for s in table_config()["sections"]} == {"eamamba"}
    lines = (FIXTURES / "eamamba.txt").read_text().splitlines()[1:]
    sd = {k: torch.full(json.loads(shape), 0.5) for k, shape, _ in (line.split("\t") for line in lines)}
    path = tmp_path / "denoise-eamamba.pth"
    torch.save({"model": {"name": "eamamba", "args": {}, "sd": sd, "sd_e": sd}, "current_iter": 1}, path)
    model = hm.create("eamamba")
    info = load_release_weights(model, path, "sd_e")
    assert info["key"] == "model/sd_e" and not info["missing"] and not info["unexpected"]
    assert float(model.state_dict()["output.weight"].flatten()[0]) == 0.5
    del sd["output.weight"]
    torch.save({"model": {"name": "eamamba", "sd": sd, "sd_e": sd}}, path)
    with pytest.raises(CheckpointError, match="output.weight"):
        load_release_weights(model, path, "sd")


# -- the experiment -----------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_every_cell_runs_loads_strictly_and_scores_by_its_route(release_files, tmp_path, one_thread):
    cfg = {"table": table_config("eamamba_tiny"), "checkpoints": {"root": str(release_files["ckpt"])},
           "data": {"root": str(release_files["data"].parent)},  # the release checkout: datasets/ below it
           "store_dir": str(tmp_path / "store"), "report_dir": str(tmp_path / "report"), "hardware": {"device": "cpu"}}
    with use_backend("torch"):
        summary = run_release_table_job(cfg, experiment="paper_eamamba_test")
    assert summary["cells"] == 23 and summary["cells_run"] == 23, summary
    rows = read_rows(tmp_path / "report" / "results.csv")
    expected = release_files["expected"]
    assert {(r["dataset"], r["task"]) for r in rows} == set(PUBLISHED)
    for r in rows:
        assert r["status"] == "ok", r
        sigma = int(r["task"][-2:]) if r["task"].startswith("denoise_gauss") else None
        psnr, ssim = expected[(r["dataset"], sigma)]
        assert float(r["psnr"]) == pytest.approx(psnr, abs=2e-4), r
        if ssim is not None:
            assert float(r["ssim"]) == pytest.approx(ssim, abs=1e-6), r
        pub_psnr, pub_ssim = PUBLISHED[(r["dataset"], r["task"])]
        assert float(r["published_psnr"]) == pub_psnr
        assert float(r["delta_psnr"]) == pytest.approx(float(r["psnr"]) - pub_psnr, abs=1e-3)
        assert (r["published_ssim"] == "") == (pub_ssim is None)
        cell_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{r['section']}__{r['row']}__{r['column']}").strip("_")
        per_image = read_rows(tmp_path / "report" / "per_image" / f"{cell_id}.csv")
        assert len(per_image) == int(r["images"])
        assert "of the release's" in r["note"]  # the tiny sets are not the paper's
    table = (tmp_path / "report" / "table.md").read_text()
    assert "34.18" in table and "not run" not in table
    assert "23 cells: 23 evaluated" in (tmp_path / "report" / "report.md").read_text()
    with use_backend("torch"):  # complete records are found again, not re-evaluated
        again = run_release_table_job(cfg, experiment="paper_eamamba_test")
    assert again["cells_run"] == 23
    assert read_rows(tmp_path / "report" / "results.csv") == rows


def test_without_files_every_cell_is_listed_as_not_run(tmp_path):
    cfg = {"table": table_config(), "checkpoints": {"root": None}, "data": {"root": str(tmp_path)},
           "store_dir": str(tmp_path / "store"), "report_dir": str(tmp_path / "report"), "hardware": {"device": "cpu"}}
    summary = run_release_table_job(cfg, experiment="paper_eamamba_test")
    assert summary["cells_not_run"] == 23
    rows = read_rows(tmp_path / "report" / "results.csv")
    assert len(rows) == 23 and all(r["status"] == "not run" for r in rows)
    assert all("checkpoints.root" in r["missing"] for r in rows)
    gopro = next(r for r in rows if r["dataset"] == "GoPro")
    assert str(tmp_path / "GoproTest/input") in gopro["missing"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "23 cells: 0 evaluated, 23 not run" in report and report.count("| not run |") == 23
    assert (tmp_path / "report" / "figures" / "psnr_ours_vs_published.png").stat().st_size > 0


def test_release_noise_on_real_mcmaster(eabench_data):
    """McMaster as the release lists it (18 images in McMaster/): each LQ is the clean image, padded to a
    multiple of 8, plus exactly the release's seeded noise of the padded shape."""
    data = ReleaseTestSet(eabench_data, "McMaster", sigma=50)
    assert len(data) == RELEASE_SETS["McMaster"].expected == 18
    for i in (0, 17):
        item = data[i]
        h, w = item["gt"].shape[-2:]
        assert item["lq"].shape[-2:] == (h + (-h) % 8, w + (-w) % 8)
        noise = release_noise(tuple(item["lq"].shape), 50)
        assert torch.allclose(item["lq"][:, :h, :w] - item["gt"], noise[:, :h, :w], atol=1e-6)
        assert float(noise.std()) == pytest.approx(50 / 255, rel=0.02)
