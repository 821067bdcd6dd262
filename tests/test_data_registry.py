"""Dataset registry, `python -m harness.data fetch` and file digests.

Fetching is tested against a loopback HTTP server (conftest's ``loopback_server``: ``http.server``
in a thread) that serves ``$EABENCH_DATA`` as a mirror: no other network is used.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import build_dataset, open_benchmark
from harness.data.__main__ import main as cli
from harness.data.datasets import file_sha256
from harness.data.fetch import ChecksumError, FetchError, OfflineError, fetch, verify
from harness.data.registry import DATASETS, get

ISSUE_NAMES = ["Train400", "BSD68", "Set12", "CBSD68", "Kodak24", "McMaster", "Urban100", "Set5", "Set14", "B100",
               "Manga109", "Classic5", "LIVE1", "DIV2K", "SIDD", "RNI15"]
# Registered name -> folder in ../shared/data (byte-identical copies of the registered sources).
SHARED = {"Train400": "Train400", "BSD68": "BSD68", "Set12": "Set12", "Set5": "Set5", "Classic5": "classic5"}
NOISE = {"name": "gaussian_noise", "sigma": 25}


def test_registry_names_every_standard_set():
    assert list(DATASETS) == ISSUE_NAMES
    for spec in DATASETS.values():
        assert spec.colour in ("grey", "rgb", "mixed") and spec.split in ("train", "val", "test")
        assert spec.source and spec.licence and spec.use
        assert spec.downloadable or "{root}" in spec.manual  # a download, or where to put the files
    assert {n for n, s in DATASETS.items() if not s.downloadable} == {"Manga109", "DIV2K", "SIDD"}
    assert get("DIV2K_val") is get("DIV2K") and get("classic5") is get("Classic5")
    with pytest.raises(KeyError, match="registered: Train400"):
        get("Set13")


def test_manifests_match_the_shared_copies(eabench_data):
    """The manifests (computed from the source repositories) equal the shared SHA256SUMS."""
    sums = {}
    for line in (eabench_data / "SHA256SUMS").read_text().splitlines():
        sha, path = line.split()
        sums[path.removeprefix("./")] = sha
    for name, folder in SHARED.items():
        manifest = {e.local.replace(get(name).gt[0].split("/")[0], folder, 1): e.sha256 for e in get(name).manifest()}
        assert manifest == {p: s for p, s in sums.items() if p.startswith(folder + "/")}, name
    mcmaster = {p: s for p, s in sums.items() if p.startswith("McMaster/")}
    assert get("McMaster").alternates() == mcmaster  # the PNG re-save of the source's TIFs
    assert verify("McMaster", eabench_data) == {"ok": sorted(mcmaster, key=lambda p: p.replace(".png", ".tif")),
                                                "missing": [], "mismatch": []}
    counts = {name: len(get(name).manifest()) for name in ("Train400", "BSD68", "Set12", "CBSD68", "Kodak24",
                                                              "McMaster", "Set14", "LIVE1", "RNI15")}
    assert counts == {"Train400": 400, "BSD68": 68, "Set12": 12, "CBSD68": 68, "Kodak24": 24, "McMaster": 18,
                      "Set14": 14, "LIVE1": 29, "RNI15": 15}


def _write_image(path: Path, rng: np.random.Generator, channels: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (8, 12, channels) if channels == 3 else (8, 12), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("name", [n for n in ISSUE_NAMES if get(n).special is None])
def test_every_registered_set_opens_from_its_fetched_layout(name, tmp_path):
    """Files placed where fetch puts them (or the first layout folder) load through data=benchmark."""
    spec, rng = get(name), np.random.default_rng(0)
    channels = 1 if spec.colour == "grey" else 3
    entries = [e.local for e in spec.manifest()] or [f"{spec.gt[0]}/0801.png", f"{spec.gt[0]}/0802.png"]
    gt_files = [p for p in entries if "/LR_bicubic/" not in p]
    for local in gt_files:
        _write_image(tmp_path / local, rng, channels)
    ds = build_dataset({"kind": "benchmark", "root": str(tmp_path), "name": name, "degradation": NOISE})
    assert len(ds) == len(gt_files) and ds.dataset_name == spec.name
    assert ds[0]["lq"].shape[0] == channels  # grey sets load as grey
    for scale in sorted({int(p.split("/X")[1].split("/")[0]) for p in entries if "/LR_bicubic/" in p}):
        for local in (p for p in entries if f"/LR_bicubic/X{scale}/" in p):
            (tmp_path / local).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12 // scale or 1, 8 // scale or 1)).save(tmp_path / local)
        paired = open_benchmark(tmp_path, name, scale=scale, check_sizes=False)
        assert paired.scale == scale and len(paired) == len(gt_files) and paired.dataset_name == f"{name}_x{scale}"


@pytest.mark.parametrize("name, channels, count", [("Set12", 1, 12), ("BSD68", 1, 68), ("Classic5", 1, 5),
                                                   ("McMaster", 3, 18), ("Train400", 1, 400)])
def test_real_sets_open_by_name(name, channels, count, eabench_data):
    ds = build_dataset({"kind": "benchmark", "root": str(eabench_data), "name": name, "degradation": NOISE})
    assert len(ds) == count and ds[0]["gt"].shape[0] == channels
    digest = ds.digest()
    assert digest["files"] == count and len(digest["sha256"]) == 64
    assert ds.describe()["files_digest"] == digest
    sr = open_benchmark(eabench_data, "Set5", scale=4)
    assert sr.digest()["files"] == 10  # 5 HR + 5 stored x4 LR


def test_digest_follows_content_not_location(eabench_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(eabench_data / "classic5", a / "classic5")
    shutil.copytree(eabench_data / "classic5", b / "classic5")
    da = open_benchmark(a, "Classic5", degradation=NOISE).digest()
    assert open_benchmark(b, "Classic5", degradation=NOISE).digest() == da
    with (b / "classic5" / "lena.bmp").open("r+b") as fh:  # one byte of pixel data
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert open_benchmark(b, "Classic5", degradation=NOISE).digest()["sha256"] != da["sha256"]


def test_fetch_downloads_and_verifies(loopback_server, eabench_data, tmp_path):
    url = loopback_server(eabench_data)
    report = fetch("Set12", tmp_path, mirror=url, progress=False)
    assert sorted(report.downloaded) == sorted(e.local for e in get("Set12").manifest()) and not report.present
    for entry in get("Set12").manifest():
        assert file_sha256(tmp_path / entry.local) == entry.sha256
    assert (tmp_path / "Set12" / "01.png").read_bytes() == (eabench_data / "Set12" / "01.png").read_bytes()
    again = fetch("Set12", tmp_path, mirror=url, progress=False)
    assert again.downloaded == [] and len(again.present) == 12
    (tmp_path / "Set12" / "03.png").unlink()
    assert fetch("Set12", tmp_path, mirror=url, progress=False).downloaded == ["Set12/03.png"]
    assert verify("Set12", tmp_path) == {"ok": [e.local for e in get("Set12").manifest()], "missing": [],
                                         "mismatch": []}
    assert len(build_dataset({"kind": "benchmark", "root": str(tmp_path), "name": "Set12", "degradation": NOISE})) == 12


def test_cli_fetch_and_verify(loopback_server, eabench_data, tmp_path, capsys):
    url = loopback_server(eabench_data)
    assert cli(["fetch", "Classic5", "--root", str(tmp_path), "--mirror", url, "--no-progress"]) == 0
    assert "Classic5: 5 files verified" in capsys.readouterr().out
    assert cli(["verify", "Classic5", "--root", str(tmp_path)]) == 0
    (tmp_path / "classic5" / "boats.bmp").write_bytes(b"not the image")
    assert cli(["verify", "Classic5", "--root", str(tmp_path)]) == 1
    assert "mismatch: classic5/boats.bmp" in capsys.readouterr().out
    assert cli(["fetch", "DIV2K", "--root", str(tmp_path)]) == 2
    assert "DIV2K_valid_HR" in capsys.readouterr().err


def test_corrupted_download_is_a_named_error(loopback_server, eabench_data, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(eabench_data / "classic5", mirror / "classic5")
    bad = mirror / "classic5" / "barbara.bmp"
    bad.write_bytes(bad.read_bytes()[:-10] + b"0123456789")
    root = tmp_path / "root"
    with pytest.raises(ChecksumError, match=r"barbara\.bmp has sha256 [0-9a-f]{64}, the manifest says 409a4b07"):
        fetch("Classic5", root, mirror=loopback_server(mirror), progress=False)
    assert not (root / "classic5" / "barbara.bmp").exists()  # a bad file is never kept
    assert not list(root.rglob("*.part"))
    assert (root / "classic5" / "baboon.bmp").is_file()  # files verified before it stay


def test_unreachable_source_fails_fast_with_placement(tmp_path):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(OfflineError) as err:
        fetch("BSD68", tmp_path, mirror=f"http://127.0.0.1:{port}", timeout=2, progress=False)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert f"{tmp_path / 'BSD68' / 'test001.png'}  <-  https://raw.githubusercontent.com/cszn/DnCNN/" in message
    assert "and 62 more" in message and "manifests/BSD68.sha256" in message
    assert not list(tmp_path.rglob("*.png"))


def test_sets_without_a_public_copy_say_where_to_put_files(tmp_path):
    with pytest.raises(FetchError, match="ValidationNoisyBlocksSrgb.mat"):
        fetch("SIDD", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"manga109\.org.*Manga109/HR"):
        open_benchmark(tmp_path, "Manga109", degradation=NOISE)
    with pytest.raises(FileNotFoundError, match="python -m harness.data fetch Kodak24"):
        open_benchmark(tmp_path, "Kodak24", degradation=NOISE)
