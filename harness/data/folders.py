"""Readers for real datasets on disk.

* :class:`PairedFolderDataset` -- LQ and GT folders matched by name. ``lq_template`` maps a GT
  stem to the LQ stem: ``"{}"`` (same name), ``"{}x4"`` (DIV2K ``0801.png`` <->
  ``0801x4.png``), ``"{}_rain"`` ... Extensions may differ between the folders.
* :class:`SingleFolderDataset` -- a folder of clean images plus a synthetic degradation
  (CBSD68, Kodak24, McMaster, Urban100 for Gaussian denoising; any HR folder for bicubic SR).
* :class:`ListFileDataset` -- list files of image paths (EAMamba's ``*_gt.txt`` / ``*_lq.txt``,
  one path per line; or one file with ``lq gt`` per line).
* :class:`SIDDValidationDataset` -- SIDD's ``ValidationNoisyBlocksSrgb.mat`` /
  ``ValidationGtBlocksSrgb.mat`` (uint8 arrays (40, 32, 256, 256, 3): 1280 blocks, named
  ``"{image:02d}_{block:02d}"``).
* :func:`open_benchmark` -- point at a root folder and a benchmark name; the folder layouts we
  know (:data:`BENCHMARK_LAYOUTS`) are tried in order and the error lists what was tried.

Problems are reported as :class:`DatasetError` (a ``ValueError``) or ``FileNotFoundError``,
always naming the file or folder: a missing folder, a GT image without an LQ partner, an
unreadable or corrupt image (:class:`~harness.data.imageio.ImageReadError`), an LQ/GT size
mismatch for the declared scale, or an LQ/GT channel mismatch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .datasets import RestorationDataset, Sample
from .degrade import Degradation, make_degradation
from .imageio import list_images, quantize_uint8, read_image, stems
from .registry import DATASETS
from .registry import get as registered


class DatasetError(ValueError):
    """A dataset on disk is inconsistent (the message names the files involved)."""


def check_pair(lq: np.ndarray, gt: np.ndarray, scale: int, lq_path: Any, gt_path: Any,
               crop_gt: bool = True) -> np.ndarray:
    """Validate an LQ/GT pair for ``scale``; returns gt (cropped to ``scale * lq`` if allowed).

    GT may exceed ``scale * lq`` by less than ``scale`` pixels (LR made from an un-modcropped HR,
    BasicSR's test-time convention: crop GT); anything else is an error naming both files.
    """
    if lq.shape[2] != gt.shape[2]:
        raise DatasetError(f"channel mismatch: LQ {lq_path} has {lq.shape[2]} channel(s), GT {gt_path} has "
                           f"{gt.shape[2]} (set channels='rgb' or 'grey' to convert both)")
    (h, w), (H, W) = lq.shape[:2], gt.shape[:2]
    if (H, W) == (h * scale, w * scale):
        return gt
    slack_ok = 0 <= H - h * scale < scale and 0 <= W - w * scale < scale
    if crop_gt and scale > 1 and slack_ok:
        return gt[: h * scale, : w * scale]
    raise DatasetError(f"size mismatch for scale {scale}: LQ {lq_path} is {h}x{w}, GT {gt_path} is {H}x{W} "
                       f"(expected GT {h * scale}x{w * scale})")


class PairedFolderDataset(RestorationDataset):
    """LQ/GT folders matched by name.

    Args:
        lq_dir, gt_dir: folders of images.
        scale: declared GT/LQ size ratio (1 for denoising/deblurring/deraining/dehazing).
        lq_template: LQ stem from GT stem, e.g. ``"{}x4"``; must contain ``{}`` exactly once.
        channels: ``None`` (require equal channel counts), ``"rgb"`` or ``"grey"`` (convert both).
        strict: raise when a GT image has no LQ partner (default); otherwise skip it.
        crop_gt: allow GT up to ``scale - 1`` px larger than ``scale * LQ`` and crop it.
        check_sizes: read every pair once at construction (fail fast, before a long run).
    """

    def __init__(self, lq_dir: str | os.PathLike, gt_dir: str | os.PathLike, scale: int = 1,
                 lq_template: str = "{}", channels: str | None = None, strict: bool = True,
                 crop_gt: bool = True, check_sizes: bool = False, cache: bool = False,
                 name: str | None = None) -> None:
        super().__init__(degradation=None, cache=cache)
        if lq_template.count("{}") != 1:
            raise ValueError(f"lq_template must contain '{{}}' exactly once, got {lq_template!r}")
        self.lq_dir, self.gt_dir = Path(lq_dir), Path(gt_dir)
        self._scale, self.channels, self.crop_gt = int(scale), channels, crop_gt
        self.lq_template = lq_template
        self.dataset_name = name or self.gt_dir.name
        for label, d in (("LQ", self.lq_dir), ("GT", self.gt_dir)):
            if not d.is_dir():
                raise FileNotFoundError(f"{label} folder not found: {d}")
        gt_files = stems(list_images(self.gt_dir))
        lq_files = stems(list_images(self.lq_dir))
        self.pairs: list[tuple[str, Path, Path]] = []
        missing = []
        for stem, gt_path in gt_files.items():
            lq_stem = lq_template.format(stem)
            if lq_stem in lq_files:
                self.pairs.append((stem, lq_files[lq_stem], gt_path))
            else:
                missing.append(f"{gt_path.name} -> {lq_stem}.*")
        if missing and strict:
            raise DatasetError(f"{len(missing)} GT image(s) in {self.gt_dir} have no LQ partner in {self.lq_dir} "
                               f"(template {lq_template!r}): {', '.join(missing[:5])}"
                               + (" ..." if len(missing) > 5 else ""))
        if not self.pairs:
            raise DatasetError(f"no LQ/GT pairs matched between {self.lq_dir} and {self.gt_dir} "
                               f"(template {lq_template!r})")
        if check_sizes:
            for i in range(len(self.pairs)):
                self._load(i)

    @property
    def scale(self) -> int:
        return self._scale

    @property
    def names(self) -> list[str]:
        return [p[0] for p in self.pairs]

    def source_files(self) -> list[tuple[str, Path]]:
        return [(f"{kind}/{path.name}", path) for _, lq, gt in self.pairs for kind, path in (("lq", lq), ("gt", gt))]

    def _load(self, index: int) -> Sample:
        stem, lq_path, gt_path = self.pairs[index]
        lq = read_image(lq_path, self.channels)
        gt = read_image(gt_path, self.channels)
        gt = check_pair(lq, gt, self._scale, lq_path, gt_path, self.crop_gt)
        record = {"name": "stored_pair", "params": {"lq_dir": str(self.lq_dir), "scale": self._scale},
                  "sampled": {"lq_file": lq_path.name, "gt_file": gt_path.name}, "seed": -1}
        return Sample(name=stem, gt=gt, lq=lq, record=record, meta={"lq_path": str(lq_path), "gt_path": str(gt_path)})

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(lq_dir=str(self.lq_dir), gt_dir=str(self.gt_dir), lq_template=self.lq_template,
                 channels=self.channels)
        return d


class SingleFolderDataset(RestorationDataset):
    """A folder of clean images; LQ images are synthesised by ``degradation``.

    ``grey=True`` converts RGB files with MATLAB rgb2gray (8-bit rounding, as grey sets are made);
    ``channels="rgb"`` replicates grey files to three channels.
    """

    def __init__(self, folder: str | os.PathLike, degradation: Degradation | Mapping[str, Any] | str,
                 seed: int = 0, grey: bool = False, channels: str | None = None,
                 same_seed_for_all: bool = False, cache: bool = False, name: str | None = None) -> None:
        super().__init__(degradation=degradation, seed=seed, same_seed_for_all=same_seed_for_all, cache=cache)
        self.folder = Path(folder)
        self.files = list_images(self.folder)  # names the folder if missing/empty
        stems(self.files)  # ambiguous stems are an error
        self.grey = grey
        # channels="y" with grey: the grey image is the 8-bit luma (MATLAB rgb2ycbcr), not rgb2gray.
        self.channels = "y" if grey and channels == "y" else "grey" if grey else channels
        self.dataset_name = name or self.folder.name

    @property
    def names(self) -> list[str]:
        return [p.stem for p in self.files]

    def source_files(self) -> list[tuple[str, Path]]:
        return [(p.name, p) for p in self.files]

    def _load(self, index: int) -> Sample:
        path = self.files[index]
        gt = read_image(path, self.channels)
        if self.grey:
            gt = quantize_uint8(gt)  # grey sets are 8-bit
        return Sample(name=path.stem, gt=gt, meta={"gt_path": str(path)})

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(folder=str(self.folder), grey=self.grey)
        return d


def read_list_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[list[Path]]:
    """Parse a list file: one image per line, or several whitespace-separated paths per line.

    Blank lines and lines starting with ``#`` are skipped. Relative paths resolve against ``root``
    if given, else against the list file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    base = Path(root) if root is not None else path.parent
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rows.append([Path(p) if os.path.isabs(p) else base / p for p in line.split()])
    if not rows:
        raise DatasetError(f"list file {path} lists no images")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise DatasetError(f"list file {path}: lines have different numbers of paths {sorted(widths)}")
    return rows


class ListFileDataset(RestorationDataset):
    """Images named by list files.

    * ``ListFileDataset(gt_list, lq_list=...)``: two files, line i of each is a pair (EAMamba);
    * ``ListFileDataset(pair_list)``: one file with ``lq_path gt_path`` per line;
    * ``ListFileDataset(gt_list, degradation=...)``: clean images plus a synthetic degradation.
    """

    def __init__(self, gt_list: str | os.PathLike, lq_list: str | os.PathLike | None = None,
                 root: str | os.PathLike | None = None, scale: int = 1,
                 degradation: Degradation | Mapping[str, Any] | str | None = None, seed: int = 0,
                 channels: str | None = None, crop_gt: bool = True, same_seed_for_all: bool = False,
                 cache: bool = False, name: str | None = None) -> None:
        super().__init__(degradation=degradation, seed=seed, same_seed_for_all=same_seed_for_all, cache=cache)
        rows = read_list_file(gt_list, root)
        self.lq_paths: list[Path] | None
        if lq_list is not None:
            lq_rows = read_list_file(lq_list, root)
            if len(lq_rows) != len(rows):
                raise DatasetError(f"list files differ in length: {gt_list} has {len(rows)} images, "
                                   f"{lq_list} has {len(lq_rows)}")
            self.gt_paths, self.lq_paths = [r[0] for r in rows], [r[0] for r in lq_rows]
        elif len(rows[0]) == 2:
            self.lq_paths, self.gt_paths = [r[0] for r in rows], [r[1] for r in rows]
        elif len(rows[0]) == 1:
            self.gt_paths, self.lq_paths = [r[0] for r in rows], None
            if degradation is None:
                raise DatasetError(f"list file {gt_list} names only clean images: give lq_list or a degradation")
        else:
            raise DatasetError(f"list file {gt_list}: expected 1 or 2 paths per line, got {len(rows[0])}")
        if self.lq_paths is not None and degradation is not None:
            raise ValueError("ListFileDataset: give either LQ images or a degradation, not both")
        self._scale, self.channels, self.crop_gt = int(scale), channels, crop_gt
        self.list_file = Path(gt_list)
        self.dataset_name = name or self.list_file.stem
        self._names = _unique_names(self.gt_paths)

    @property
    def scale(self) -> int:
        return self._scale if self.lq_paths is not None else super().scale

    @property
    def names(self) -> list[str]:
        return self._names

    def source_files(self) -> list[tuple[str, Path]]:
        lq = [(f"lq/{n}{p.suffix}", p) for n, p in zip(self._names, self.lq_paths or [])]
        return lq + [(f"gt/{n}{p.suffix}", p) for n, p in zip(self._names, self.gt_paths)]

    def _load(self, index: int) -> Sample:
        gt_path = self.gt_paths[index]
        gt = read_image(gt_path, self.channels)
        if self.lq_paths is None:
            return Sample(name=self._names[index], gt=gt, meta={"gt_path": str(gt_path)})
        lq_path = self.lq_paths[index]
        lq = read_image(lq_path, self.channels)
        gt = check_pair(lq, gt, self._scale, lq_path, gt_path, self.crop_gt)
        record = {"name": "stored_pair", "params": {"list_file": str(self.list_file), "scale": self._scale},
                  "sampled": {"lq_file": str(lq_path), "gt_file": str(gt_path)}, "seed": -1}
        return Sample(name=self._names[index], gt=gt, lq=lq, record=record,
                      meta={"lq_path": str(lq_path), "gt_path": str(gt_path)})


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems, disambiguated with the parent folder where stems repeat (GoPro scenes)."""
    st = [p.stem for p in paths]
    if len(set(st)) == len(st):
        return st
    names = [f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(names)) != len(names):
        names = [str(p) for p in paths]
    return names


SIDD_NOISY_FILE = "ValidationNoisyBlocksSrgb.mat"
SIDD_GT_FILE = "ValidationGtBlocksSrgb.mat"
SIDD_NOISY_KEY = "ValidationNoisyBlocksSrgb"
SIDD_GT_KEY = "ValidationGtBlocksSrgb"


def load_mat_array(path: str | os.PathLike, key: str) -> np.ndarray:
    """Read array ``key`` from a MATLAB .mat file (v5 via scipy; v7.3/HDF5 via h5py if present)."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MATLAB file not found: {path}")
    try:
        data = scipy.io.loadmat(str(path), variable_names=[key])
    except NotImplementedError:  # MATLAB v7.3 files are HDF5
        try:
            import h5py
        except ImportError as e:
            raise DatasetError(f"{path} is a MATLAB v7.3 (HDF5) file; install h5py to read it") from e
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DatasetError(f"{path} has no variable {key!r} (found {sorted(f.keys())})") from None
            # h5py returns MATLAB arrays with reversed axis order.
            return np.ascontiguousarray(np.asarray(f[key]).transpose())
    except Exception as e:
        raise DatasetError(f"cannot read MATLAB file {path}: {e}") from e
    if key not in data:
        # loadmat was asked for `key` only; list what the file does hold for the message.
        found = sorted(name for name, _shape, _cls in scipy.io.whosmat(str(path)))
        raise DatasetError(f"{path} has no variable {key!r} (found {found})")
    return data[key]


class SIDDValidationDataset(RestorationDataset):
    """SIDD sRGB validation blocks from the two .mat files (1280 blocks of 256x256).

    Args:
        root: folder holding both .mat files (or pass ``noisy_mat`` and ``gt_mat`` explicitly).
    """

    def __init__(self, root: str | os.PathLike | None = None, noisy_mat: str | os.PathLike | None = None,
                 gt_mat: str | os.PathLike | None = None) -> None:
        super().__init__(degradation=None)
        if root is not None:
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"SIDD folder not found: {root}")
            noisy_mat = noisy_mat or root / SIDD_NOISY_FILE
            gt_mat = gt_mat or root / SIDD_GT_FILE
        if noisy_mat is None or gt_mat is None:
            raise ValueError("SIDDValidationDataset: give root, or both noisy_mat and gt_mat")
        self.noisy_mat, self.gt_mat = Path(noisy_mat), Path(gt_mat)
        noisy = load_mat_array(self.noisy_mat, SIDD_NOISY_KEY)
        gt = load_mat_array(self.gt_mat, SIDD_GT_KEY)
        for path, arr in ((self.noisy_mat, noisy), (self.gt_mat, gt)):
            if arr.dtype != np.uint8 or arr.ndim != 5 or arr.shape[-1] != 3:
                raise DatasetError(f"{path}: expected uint8 blocks (images, blocks, H, W, 3), "
                                   f"got {arr.dtype} {arr.shape}")
        if noisy.shape != gt.shape:
            raise DatasetError(f"SIDD block arrays differ: {self.noisy_mat} {noisy.shape} vs {self.gt_mat} {gt.shape}")
        self.noisy, self.gt = noisy, gt
        n_img, n_blk = noisy.shape[:2]
        self._index = [(i, b) for i in range(n_img) for b in range(n_blk)]
        self.dataset_name = "SIDD_val"

    @property
    def names(self) -> list[str]:
        return [f"{i:02d}_{b:02d}" for i, b in self._index]

    def source_files(self) -> list[tuple[str, Path]]:
        return [("noisy/" + self.noisy_mat.name, self.noisy_mat), ("gt/" + self.gt_mat.name, self.gt_mat)]

    def _load(self, index: int) -> Sample:
        i, b = self._index[index]
        lq = self.noisy[i, b].astype(np.float32) / 255.0
        gt = self.gt[i, b].astype(np.float32) / 255.0
        record = {"name": "stored_pair", "params": {"source": "SIDD sRGB validation blocks"},
                  "sampled": {"image": i, "block": b}, "seed": -1}
        return Sample(name=f"{i:02d}_{b:02d}", gt=gt, lq=lq, record=record)


# Folder layouts tried by open_benchmark, relative to the root (from the dataset registry);
# "{s}" is the SR scale. "gt": clean/HR folders; "lq": matching LR folders with their name template.
BENCHMARK_LAYOUTS: dict[str, dict[str, Any]] = {
    spec.name: {"gt": list(spec.gt), "lq": list(spec.lq)} for spec in DATASETS.values() if spec.special is None
}


def _first_dir(root: Path, candidates: Sequence[str], what: str) -> Path:
    for rel in candidates:
        if (root / rel).is_dir():
            return root / rel
    tried = ", ".join(str(root / c) for c in candidates)
    raise FileNotFoundError(f"{what}: none of the known folders exists (tried {tried})")


def open_benchmark(root: str | os.PathLike, name: str, *, scale: int = 1,
                   degradation: Degradation | Mapping[str, Any] | str | None = None, seed: int = 0,
                   grey: bool | None = None, channels: str | None = None, **kwargs: Any) -> RestorationDataset:
    """Open registered set ``name`` (:mod:`harness.data.registry`) under ``root``.

    * With ``degradation`` (e.g. Gaussian noise): the clean folder plus that degradation.
    * With ``scale > 1`` and no degradation: stored LR images if an LR folder exists, else LR
      images synthesised by MATLAB bicubic downscaling (recorded as ``bicubic_down``).
    * ``grey=None`` follows the registry: grey sets load as grey, the others as stored.
    * ``name == "SIDD"``: :class:`SIDDValidationDataset` on ``root`` (or ``root/SIDD``).
    A missing set names the folders tried and says how to get it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    spec = registered(name)  # KeyError listing the registered names
    if spec.special == "sidd":
        for folder in (root, root / "SIDD", root / "SIDD/val", root / "test/SIDD"):
            if (folder / SIDD_NOISY_FILE).is_file():
                return SIDDValidationDataset(folder)
        raise FileNotFoundError(f"SIDD: {SIDD_NOISY_FILE} not found in {root} or its SIDD/, SIDD/val/, "
                                f"test/SIDD/ subfolders. {spec.placement(root)}")
    if grey is None:
        grey = spec.colour == "grey"
    try:
        gt_dir = _first_dir(root, spec.gt, f"{spec.name} clean images")
    except FileNotFoundError as err:
        hint = (f"`python -m harness.data fetch {spec.name} --root {root}` downloads it"
                if spec.downloadable else spec.placement(root))
        raise FileNotFoundError(f"{err}. {hint}") from None
    if degradation is None and scale > 1:
        for lq_rel, template in spec.lq:
            lq_dir = root / lq_rel.format(s=scale)
            if lq_dir.is_dir():
                return PairedFolderDataset(lq_dir, gt_dir, scale=scale, lq_template=template.format("{}", s=scale),
                                           channels="grey" if grey else channels, name=f"{spec.name}_x{scale}",
                                           **kwargs)
        degradation = make_degradation("bicubic_down", scale=scale)
    if degradation is None:
        raise ValueError(f"{spec.name}: give a degradation (e.g. {{'name': 'gaussian_noise', 'sigma': 25}}) "
                         "or scale > 1")
    return SingleFolderDataset(gt_dir, degradation, seed=seed, grey=grey, channels=channels, name=spec.name,
                               **kwargs)
