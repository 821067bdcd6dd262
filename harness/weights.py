"""Registry of published pretrained weights: where the authors publish each file, its sha256,
licence, the input range it expects and the preset it loads into.

``checkpoint=PATH`` loads any of them as downloaded (``.mat`` MatConvNet files included, see
:mod:`harness.checkpoints`); the loader reports the file's sha256 and, when it is one of these,
its registry name, so a record says exactly which release produced a number.

Downloads are pinned to a commit (``raw.githubusercontent.com/<repo>/<commit>/<path>``) or to
a release asset; the sha256 below was computed from those files.
``python -m harness.weights fetch NAME --dir DIR`` downloads one and checks it (``--mirror URL``
reads ``URL/<file>`` instead, e.g. a lab copy); ``python -m harness.weights list`` shows them all.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

DNCNN_COMMIT = "e93b27812d3ff523a3a79d19e5e50d233d7a8d0a"  # cszn/DnCNN
FFDNET_COMMIT = "e787f46df2f374ff3591186706229cb9a0591fea"  # cszn/FFDNet
_DNCNN_RAW = f"https://raw.githubusercontent.com/cszn/DnCNN/{DNCNN_COMMIT}"
_FFDNET_RAW = f"https://raw.githubusercontent.com/cszn/FFDNet/{FFDNET_COMMIT}"
# Neither cszn/DnCNN nor cszn/FFDNet has a licence file; their READMEs ask users to cite the papers.
_NO_LICENCE = "none stated (no licence file in the repository; research use, cite the paper)"


@dataclass(frozen=True)
class Weights:
    """One published weights file."""

    name: str
    file: str  # local file name (what the data and CI folders call it)
    url: str
    sha256: str
    preset: str  # conf/model/<preset>.yaml it loads into with strict=True
    licence: str
    input_range: tuple[float, float]  # pixel range the network was trained on
    paper: str
    notes: str = ""


def _entry(**kw) -> Weights:
    kw.setdefault("input_range", (0.0, 1.0))
    return Weights(**kw)


_DNCNN_PAPER = "Zhang et al., Beyond a Gaussian Denoiser, TIP 2017"
_FFDNET_PAPER = "Zhang, Zuo and Zhang, FFDNet, TIP 2018"

WEIGHTS: dict[str, Weights] = {w.name: w for w in [
    *[_entry(name=f"dncnn_s_sigma{s}", file=f"dncnn_s_sigma{s}.mat",
             url=f"{_DNCNN_RAW}/model/specifics/sigma={s}.mat", sha256=sha, preset="dncnn_gray17",
             licence=_NO_LICENCE, paper=_DNCNN_PAPER,
             notes=f"DnCNN-S: grey, trained at sigma {s}; output = input - net(input)")
      for s, sha in ((15, "657d5115fa05d371dbf0df1f0a931eff274dae29d08a9cc0824a28caf2460e21"),
                     (25, "5a5404c9e3ef14e353760e14b885439408a654618e14f13b2e97b99b9835020b"),
                     (50, "517dc0b55a8da2c129704ed7921b8557aac40cf3aae9f700dc41a9e25cad0983"))],
    _entry(name="dncnn_b_gray_blind", file="dncnn_b_gray_blind.mat", url=f"{_DNCNN_RAW}/model/GD_Gray_Blind.mat",
           sha256="37f76da0b71dd2b2789ce91848fe2f184ab486203c9af9ac1b98199b60ea02b0", preset="dncnn_gray20",
           licence=_NO_LICENCE, paper=_DNCNN_PAPER, notes="DnCNN-B: blind grey denoising, sigma in [0, 55]"),
    _entry(name="cdncnn_b_color_blind", file="cdncnn_b_color_blind.mat", url=f"{_DNCNN_RAW}/model/GD_Color_Blind.mat",
           sha256="57db5437a44037e7675a99042fe7b14d3dcdf1c333d3ec665855566e8a59795c", preset="dncnn_color20",
           licence=_NO_LICENCE, paper=_DNCNN_PAPER, notes="CDnCNN-B: blind colour denoising, sigma in [0, 55]"),
    _entry(name="dncnn3", file="dncnn3.mat", url=f"{_DNCNN_RAW}/model/DnCNN3.mat",
           sha256="3962377d522b6728417e364bf7a589cf34ddfb592af0bd9769e53f8123d17677", preset="dncnn_gray20",
           licence=_NO_LICENCE, paper=_DNCNN_PAPER,
           notes="DnCNN-3: one grey model for blind denoising, SR on the bicubic-upscaled Y channel and "
                 "JPEG deblocking (Demo_test_DnCNN3.m)"),
    _entry(name="fdncnn_gray", file="fdncnn_gray.mat", url=f"{_DNCNN_RAW}/model/FDnCNN_gray.mat",
           sha256="0f1941edbb9181a0214f9144c3bda8669f9ff036a01c20c9b3c0bf56b2e85a4e", preset="fdncnn_gray",
           licence=_NO_LICENCE, paper=_DNCNN_PAPER, notes="FDnCNN: noise-level map input (sigma/255), sigma in [0, 75]"),
    _entry(name="fdncnn_color", file="fdncnn_color.mat", url=f"{_DNCNN_RAW}/model/FDnCNN_color.mat",
           sha256="f92823de4227811aa603c849d2495722c54d17d51b3a9df2ac804976daf258c3", preset="fdncnn_color",
           licence=_NO_LICENCE, paper=_DNCNN_PAPER, notes="FDnCNN colour: noise-level map input, sigma in [0, 75]"),
    _entry(name="ffdnet_gray", file="ffdnet_gray.mat", url=f"{_FFDNET_RAW}/models/FFDNet_gray.mat",
           sha256="14c231e87a444a9bd85b0b5e174e73b4f6ac50bf4050e75a0d3f4d69f77a2093", preset="ffdnet_gray",
           licence=_NO_LICENCE, paper=_FFDNET_PAPER,
           notes="FFDNet grey: 2x2 unshuffled input + noise-level map (sigma/255), sigma in [0, 75]"),
    _entry(name="ffdnet_color", file="ffdnet_color.mat", url=f"{_FFDNET_RAW}/models/FFDNet_color.mat",
           sha256="a4b5a9da21294ab9ba6ed5c6cc459c46dff20c025eb7d3ab82e8e0bb00541793", preset="ffdnet_color",
           licence=_NO_LICENCE, paper=_FFDNET_PAPER,
           notes="FFDNet colour: 2x2 unshuffled input + noise-level map (sigma/255), sigma in [0, 75]"),
    _entry(name="kair_dncnn_25", file="dncnn_25.pth", url="https://github.com/cszn/KAIR/releases/download/v1.0/dncnn_25.pth",
           sha256="0451a70de9b672ae037270498fbb1c17a1c1c4403785df586ff65df5b858e5b0", preset="dncnn_gray17",
           licence="MIT (cszn/KAIR)", paper=_DNCNN_PAPER,
           notes="KAIR's PyTorch DnCNN-S sigma 25 (plain state dict, batch norm folded)"),
]}


def get(name: str) -> Weights:
    """The registry entry ``name``; unknown names list the known ones."""
    if name not in WEIGHTS:
        raise KeyError(f"unknown weights {name!r}; registered: {', '.join(sorted(WEIGHTS))}")
    return WEIGHTS[name]


def for_preset(preset: str) -> list[Weights]:
    """Every registered file that loads into ``preset``."""
    return [w for w in WEIGHTS.values() if w.preset == preset]


def fetch(name: str, folder: str | Path, *, mirror: str | None = None, timeout: float = 10.0) -> Path:
    """Download registered weights ``name`` into ``folder`` (kept only if the sha256 matches)."""
    from harness.checkpoints import file_identity
    from harness.data.fetch import download_verified

    entry = get(name)
    path = Path(folder) / entry.file
    if path.is_file() and file_identity(path)["sha256"] == entry.sha256:
        return path
    url = f"{mirror.rstrip('/')}/{entry.file}" if mirror else entry.url
    download_verified(url, path, entry.sha256, timeout=timeout,
                      placement=f"place {entry.url} (sha256 {entry.sha256}) at {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.weights", description="published pretrained weights")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    p = sub.add_parser("fetch")
    p.add_argument("name", help=f"one of: {', '.join(WEIGHTS)}")
    p.add_argument("--dir", required=True)
    p.add_argument("--mirror")
    p.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "list":
        for w in WEIGHTS.values():
            print(f"{w.name:22s} preset={w.preset:14s} {w.url}")
        return 0
    from harness.data.fetch import FetchError

    try:
        path = fetch(args.name, args.dir, mirror=args.mirror, timeout=args.timeout)
    except (FetchError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print(f"{args.name}: {path} (sha256 verified); use checkpoint={path} model={get(args.name).preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
