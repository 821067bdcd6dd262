"""The EAMamba release's test sets, read the way its evaluation scripts read them.

``data.root`` is the folder the release calls ``datasets/`` (its list files name paths like
``datasets/GoproTest/input/x.png``); a root that holds a ``datasets/`` folder (the release's own
checkout) is accepted too. Layouts, from the release's ``datasets/list/*`` files:

============  =====================================================  ============================
set           files under the root                                   pairing (images)
============  =====================================================  ============================
CBSD68        ``CBSD68/original_png/*.png``                          clean only (68)
Kodak24       ``Kodak24/*.png``                                      clean only (24)
McMaster      ``McMaster/*.tif``                                     clean only (18)
Urban100      ``SR/benchmark/Urban100/HR/*.png``                     clean only (100)
SIDD          ``SIDD/test/SIDD/Validation{Noisy,Gt}BlocksSrgb.mat``  40×32 blocks (1280)
GoPro         ``GoproTest/{input,target}/*.png``                     same name (1111)
HIDE          ``HideTest/{input,target}/*.png``                      same name (2025)
SOTS-indoor   ``RESIDE-standard-ITS/test/{hazy,gt}``                 ``1400_3.png`` -> ``1400.png`` (500)
SOTS-outdoor  ``SOTS/outdoor/{hazy,gt}``                             ``0001_0.8_0.2.jpg`` -> ``0001.png`` (500)
DPDD-*        ``dd_dp_dataset_png/test_c/{source,target}``           sorted position (76; 37 indoor, 39 outdoor)
RealSR-x{s}   ``RealSR/{Canon,Nikon}/Test/{s}/*_{HR,LR{s}}.png``     ``X_HR`` <- ``X_LR{s}`` (100 each)
============  =====================================================  ============================

Reading follows ``cv2.imread(path)`` + BGR→RGB: 8-bit RGB; 16-bit files (DPDD's PNGs) keep
their high byte, as OpenCV's default colour read does; grey files are replicated to three
channels; alpha is dropped. Every item's LQ image is reflect-padded on the right and bottom to a
multiple of 8 (the release's ``calc_padding(h, w, base=8)`` in its datasets, and ``factor = 8``
in ``gen_deblur_png.py``); the GT keeps its size and the caller crops the output back to it.

Gaussian sets draw the release's test noise: ``torch.manual_seed(2454)`` before *each* image,
``randn`` of the *padded* LQ's shape times ``σ/255`` (float32), added to the padded clean image,
not clipped (``datasets/denoising_data.py``, phase ``test``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .folders import SIDD_GT_FILE, SIDD_NOISY_FILE, DatasetError, SIDDValidationDataset
from .imageio import ImageReadError, list_images

PAD_MULTIPLE = 8
GAUSSIAN_TEST_SEED = 2454

# DPDD's indoor scenes: the target files of the release's DPDD_indoor_test_gt.txt (the other 39
# of the 76 test_c targets are its outdoor list).
DPDD_INDOOR_TARGETS = frozenset(f"1P0A{n}.png" for n in (
    1045, 1064, 1068, 1111, 1435, 1443, 1489, 1735, 1891, 1911, 1917, 1925, 1933, 1974, 1980, 1985, 1986,
    1993, 2002, 2015, 2031, 2067, 2075, 2099, 2152, 2153, 2176, 2201, 2205, 2240, 2259, 2260, 2316, 2349,
    2356, 2514, 2520))


@dataclass(frozen=True)
class ReleaseSet:
    """One test set as the release lays it out; ``expected`` is its image count in the release."""

    name: str
    kind: str                 # "gaussian" | "pairs" | "sidd_blocks"
    folders: tuple[str, ...]  # relative to the root: (clean,) | (lq, gt) | (mat folder,)
    expected: int
    list_file: str            # the release's list (or script) this layout comes from


RELEASE_SETS: dict[str, ReleaseSet] = {s.name: s for s in (
    ReleaseSet("CBSD68", "gaussian", ("CBSD68/original_png",), 68, "datasets/list/Denoise/CBSD68.txt"),
    ReleaseSet("Kodak24", "gaussian", ("Kodak24",), 24, "datasets/list/Denoise/Kodak24.txt"),
    ReleaseSet("McMaster", "gaussian", ("McMaster",), 18, "datasets/list/Denoise/McMaster.txt"),
    ReleaseSet("Urban100", "gaussian", ("SR/benchmark/Urban100/HR",), 100, "datasets/list/Denoise/Urban100.txt"),
    ReleaseSet("SIDD", "sidd_blocks", ("SIDD/test/SIDD",), 1280, "task_evaluation/gen_sidd_mat.py"),
    ReleaseSet("GoPro", "pairs", ("GoproTest/input", "GoproTest/target"), 1111,
               "datasets/list/Deblur/GoPro_valid_{lq,gt}.txt"),
    ReleaseSet("HIDE", "pairs", ("HideTest/input", "HideTest/target"), 2025, "datasets/list/Deblur/HIDE_test_{lq,gt}.txt"),
    ReleaseSet("SOTS-indoor", "pairs", ("RESIDE-standard-ITS/test/hazy", "RESIDE-standard-ITS/test/gt"), 500,
               "datasets/list/Dehaze/RESIDE_standard_ITS_test_{lq,gt}.txt"),
    ReleaseSet("SOTS-outdoor", "pairs", ("SOTS/outdoor/hazy", "SOTS/outdoor/gt"), 500,
               "datasets/list/Dehaze/RESIDE_standard_OTS_test_{lq,gt}.txt"),
    ReleaseSet("DPDD-indoor", "pairs", ("dd_dp_dataset_png/test_c/source", "dd_dp_dataset_png/test_c/target"), 37,
               "datasets/list/Deblur/DPDD_indoor_test_{lq,gt}.txt"),
    ReleaseSet("DPDD-outdoor", "pairs", ("dd_dp_dataset_png/test_c/source", "dd_dp_dataset_png/test_c/target"), 39,
               "datasets/list/Deblur/DPDD_outdoor_test_{lq,gt}.txt"),
    ReleaseSet("DPDD", "pairs", ("dd_dp_dataset_png/test_c/source", "dd_dp_dataset_png/test_c/target"), 76,
               "datasets/list/Deblur/DPDD_test_{lq,gt}.txt"),
    *(ReleaseSet(f"RealSR-x{s}", "pairs", tuple(f"RealSR/{cam}/Test/{s}" for cam in ("Canon", "Nikon")), 100,
                 f"datasets/list/SR/RealSRx{s}_valid_{{lq,gt}}.txt") for s in (2, 3, 4)),
)}


def release_root(root: str | os.PathLike) -> Path:
    """The folder holding the sets: ``root`` itself, or ``root/datasets`` for a release checkout."""
    root = Path(root)
    if (root / "datasets").is_dir() and not any((root / f).exists() for s in RELEASE_SETS.values()
                                                for f in s.folders):
        return root / "datasets"
    return root


def missing_files(root: str | os.PathLike, name: str) -> list[str]:
    """What set ``name`` needs under ``root`` and does not find (empty when it can be opened)."""
    spec = _spec(name)
    base = release_root(root)
    if spec.kind == "sidd_blocks":
        return [str(base / spec.folders[0] / f) for f in (SIDD_NOISY_FILE, SIDD_GT_FILE)
                if not (base / spec.folders[0] / f).is_file()]
    return [str(base / f) for f in spec.folders if not (base / f).is_dir()]


def read_uint8_rgb(path: str | os.PathLike) -> np.ndarray:
    """``cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)``: uint8 (H, W, 3), 16-bit -> high byte."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit grey
            else:  # Pillow decodes 16-bit RGB PNGs to their high bytes, as OpenCV does
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr)


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Reflect-pad a (C, H, W) image on the right and bottom to a multiple (torchvision ``Pad``)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x.unsqueeze(0), (0, pw, 0, ph), mode="reflect").squeeze(0)


def release_noise(shape: tuple[int, ...], sigma: float, seed: int = GAUSSIAN_TEST_SEED) -> torch.Tensor:
    """The release's test noise for one image: N(0, 1) of ``shape`` after seeding, times σ/255."""
    gen = torch.Generator().manual_seed(seed)
    level = torch.tensor([float(sigma)], dtype=torch.float32) / 255.0
    return torch.randn(shape, generator=gen).mul_(level).float()


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255.0)  # ToTensor on uint8


def _spec(name: str) -> ReleaseSet:
    if name not in RELEASE_SETS:
        raise KeyError(f"unknown release test set {name!r}; known: {', '.join(RELEASE_SETS)}")
    return RELEASE_SETS[name]


def _images(folder: Path) -> list[Path]:
    try:
        return list_images(folder)
    except ValueError as e:
        raise DatasetError(str(e)) from e


def _pairs_by(lq_dir: Path, gt_dir: Path, gt_stem: Callable[[str], str]) -> list[tuple[str, Path, Path]]:
    """(name, lq, gt) for every LQ file whose GT (by ``gt_stem`` of its stem) exists."""
    gts = {p.stem: p for p in _images(gt_dir)}
    pairs, orphans = [], []
    for lq in _images(lq_dir):
        key = gt_stem(lq.stem)
        if key in gts:
            pairs.append((lq.stem, lq, gts[key]))
        else:
            orphans.append(lq.name)
    if orphans:
        raise DatasetError(f"{len(orphans)} input image(s) in {lq_dir} have no target in {gt_dir}: "
                           f"{', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}")
    return pairs


def _dpdd_pairs(source: Path, target: Path, subset: str) -> list[tuple[str, Path, Path]]:
    """DPDD's source/target numbers differ by one or two, so the release pairs sorted lists."""
    src, tgt = _images(source), _images(target)
    if len(src) != len(tgt):
        raise DatasetError(f"DPDD: {len(src)} source images in {source} but {len(tgt)} targets in {target}; the "
                           "release pairs them by sorted position, so the counts must match")
    pairs = [(t.stem, s, t) for s, t in zip(src, tgt)]
    if subset == "indoor":
        return [p for p in pairs if p[2].name in DPDD_INDOOR_TARGETS]
    if subset == "outdoor":
        return [p for p in pairs if p[2].name not in DPDD_INDOOR_TARGETS]
    return pairs


def _realsr_pairs(base: Path, folders: tuple[str, ...], scale: int) -> list[tuple[str, Path, Path]]:
    pairs = []
    for rel in folders:
        folder = base / rel
        hr = sorted(folder.glob("*_HR.png"))
        if not hr:
            raise DatasetError(f"RealSR: no *_HR.png files in {folder}")
        for gt in hr:
            lq = gt.with_name(gt.name.replace("_HR.png", f"_LR{scale}.png"))
            if not lq.is_file():
                raise DatasetError(f"RealSR: {gt} has no low-resolution partner {lq.name}")
            pairs.append((gt.stem[: -len("_HR")], lq, gt))
    return pairs


class ReleaseTestSet(torch.utils.data.Dataset):
    """Items ``{"lq": (3, H8, W8) padded, "gt": (3, H, W), "name", "lq_size": (H, W)}``, float32.

    ``sigma`` is required for the Gaussian sets (15, 25, 50) and refused for the others.
    """

    def __init__(self, root: str | os.PathLike, name: str, sigma: float | None = None) -> None:
        self.spec = _spec(name)
        self.name, self.sigma = name, sigma
        self.dataset_name = name
        base = release_root(root)
        missing = missing_files(root, name)
        if missing:
            raise FileNotFoundError(f"{name}: not found under {base}: {', '.join(missing)}")
        if (self.spec.kind == "gaussian") != (sigma is not None):
            raise ValueError(f"{name}: sigma is {'required' if self.spec.kind == 'gaussian' else 'not used'} "
                             f"(got {sigma!r})")
        self._sidd = None
        self.pairs: list[tuple[str, Path | None, Path]] = []
        if self.spec.kind == "gaussian":
            self.pairs = [(p.stem, None, p) for p in _images(base / self.spec.folders[0])]
        elif self.spec.kind == "sidd_blocks":
            self._sidd = SIDDValidationDataset(base / self.spec.folders[0])
        elif name.startswith("DPDD"):
            subset = {"DPDD-indoor": "indoor", "DPDD-outdoor": "outdoor"}.get(name, "all")
            self.pairs = _dpdd_pairs(base / self.spec.folders[0], base / self.spec.folders[1], subset)
        elif name.startswith("RealSR"):
            self.pairs = _realsr_pairs(base, self.spec.folders, int(name[-1]))
        else:
            # GoPro/HIDE: same file name; SOTS: the GT is the hazy name's first "_" field.
            stem = (lambda s: re.split("_", s, maxsplit=1)[0]) if name.startswith("SOTS") else (lambda s: s)
            self.pairs = _pairs_by(base / self.spec.folders[0], base / self.spec.folders[1], stem)

    def __len__(self) -> int:
        return len(self._sidd) if self._sidd is not None else len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._sidd is not None:
            item = self._sidd[index]  # 256x256 blocks: no padding
            return {"lq": item["lq"], "gt": item["gt"], "name": item["name"], "lq_size": tuple(item["lq"].shape[-2:])}
        name, lq_path, gt_path = self.pairs[index]
        gt_arr = read_uint8_rgb(gt_path)
        gt = _to_tensor(gt_arr)
        if lq_path is None:  # Gaussian: noise drawn on the padded clean image
            lq = pad_to_multiple(gt.clone())
            lq = lq + release_noise(tuple(lq.shape), self.sigma)
        else:
            lq_arr = read_uint8_rgb(lq_path)
            if lq_arr.shape != gt_arr.shape:
                raise DatasetError(f"{self.name}: input {lq_path} is {lq_arr.shape[:2]} but target {gt_path} is "
                                   f"{gt_arr.shape[:2]}; the release's scale-1 models need equal sizes")
            lq = pad_to_multiple(_to_tensor(lq_arr))
        return {"lq": lq, "gt": gt, "name": name, "lq_size": tuple(gt.shape[-2:])}

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "size": len(self), "expected": self.spec.expected, "layout": self.spec.folders,
                "release_list": self.spec.list_file, "sigma": self.sigma}
