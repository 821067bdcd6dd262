"""The embedded default dataset: RGB photos shipped inside scikit-image and matplotlib.

Needs no download, so ``python run.py`` works on a fresh offline machine. Eleven 8-bit RGB images:

=========================  ===========  =====================================================
name                       size (HxW)   source
=========================  ===========  =====================================================
hubble_deep_field          872 x 1000   ``skimage.data.hubble_deep_field()``
immunohistochemistry       512 x 512    ``skimage.data.immunohistochemistry()``
retina                     1411 x 1411  ``skimage.data.retina()``
rocket                     427 x 640    ``skimage.data.rocket()``
motorcycle_left            500 x 741    ``skimage.data.stereo_motorcycle()[0]``
motorcycle_right           500 x 741    ``skimage.data.stereo_motorcycle()[1]``
coffee                     400 x 600    ``skimage.data.coffee()``
colorwheel                 370 x 371    ``skimage.data.colorwheel()``
astronaut                  512 x 512    ``skimage.data.astronaut()``
chelsea                    300 x 451    ``skimage.data.chelsea()``
grace_hopper               600 x 512    matplotlib ``mpl-data/sample_data/grace_hopper.jpg``
=========================  ===========  =====================================================

Fixed split (:data:`SPLITS`), chosen so that no scene appears in two splits (both stereo views of
the motorcycle are in ``train``) and the test images are ordinary natural photos (faces, a cat, a
portrait), the content of CBSD68/Kodak24:

* ``train``: hubble_deep_field, immunohistochemistry, retina, rocket, motorcycle_left,
  motorcycle_right (6 images, 3.6 Mpx)
* ``val``: coffee, colorwheel (2)
* ``test``: astronaut, chelsea, grace_hopper (3)

Grey variants (``grey=True``): MATLAB ``rgb2gray`` of the RGB image, rounded to 8 bits, like the
grey benchmark sets. :data:`EMBEDDED_SHA256` holds a checksum of each image's pixels; a mismatch
(another scikit-image release re-encoding an image) is warned about and recorded in
:meth:`EmbeddedDataset.describe`.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .datasets import RestorationDataset, Sample
from .degrade import Degradation
from .imageio import quantize_uint8, rgb_to_grey


def _skimage(fn_name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, fn_name)()
        return out[index] if index is not None else out
    load.__name__ = f"skimage.data.{fn_name}" + (f"[{index}]" if index is not None else "")
    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook
    from PIL import Image

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "rocket": _skimage("rocket"),
    "motorcycle_left": _skimage("stereo_motorcycle", 0),
    "motorcycle_right": _skimage("stereo_motorcycle", 1),
    "coffee": _skimage("coffee"),
    "colorwheel": _skimage("colorwheel"),
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "grace_hopper": _grace_hopper,
}

SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("hubble_deep_field", "immunohistochemistry", "retina", "rocket", "motorcycle_left",
              "motorcycle_right"),
    "val": ("coffee", "colorwheel"),
    "test": ("astronaut", "chelsea", "grace_hopper"),
}
SPLITS["all"] = SPLITS["train"] + SPLITS["val"] + SPLITS["test"]

# sha256 of the uint8 RGB pixel bytes (C order), as shipped by scikit-image 0.26 / matplotlib 3.11
# (grace_hopper decoded by Pillow 13).
EMBEDDED_SHA256: dict[str, str] = {
    "hubble_deep_field": "9a3ea9548188f81e63435188456e74de45a981ebeb791e265abe79a26d3b528b",
    "immunohistochemistry": "c5b3ef509a92f16d4c29be8cf0300fe75d53e13a3ce650159db932caea8dcc1b",
    "retina": "3670e389d0dae9f755cc1bb7e4da4c3d2cdf10eba2dc3060836d8d4b8024d860",
    "rocket": "3d4435cc745752b7f9724df88c6e18817de3ce7e3d2d71c55f85f7831e68f197",
    "motorcycle_left": "ca829467c1d4f427da9c4862ba43829da6ac90afe1f75735e95dba9e3fd9620b",
    "motorcycle_right": "ae44d83f55e66623c7985499fd2f1685a56023e442e66eca89b3457dd46b17af",
    "coffee": "0ce2b51640b9c95f19617f03eabf40c3f0368589cc1ee1190b70966165ac184f",
    "colorwheel": "4ce89baa8b291cfec33e2e67908a588b16eee46478ad4b664a93c7a17ea4b277",
    "astronaut": "a8c429c18afa7b0fd5673e598d73a21225d94c864a71bbb3885126fdecb41071",
    "chelsea": "416b729128bfb2c3d1eb69bf9b1734a796293abc17939267b2dc94f8a5784031",
    "grace_hopper": "f7f982de68dd296af67ee51b2a95a2e5658f7bf064c6536520b66bae8d01fc34",
}


def pixel_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.uint8).tobytes()).hexdigest()


@lru_cache(maxsize=None)
def load_embedded_uint8(name: str) -> np.ndarray:
    """The uint8 ``(H, W, 3)`` RGB pixels of embedded image ``name`` (cached, read-only)."""
    if name not in _LOADERS:
        raise KeyError(f"unknown embedded image {name!r}; known: {', '.join(SPLITS['all'])}")
    try:
        arr = np.asarray(_LOADERS[name]())
    except Exception as e:  # a package release without the image, or a download attempt offline
        raise RuntimeError(f"cannot load embedded image {name!r} via {_LOADERS[name].__name__}: {e}") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise RuntimeError(f"embedded image {name!r}: expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    expected = EMBEDDED_SHA256.get(name)
    if expected is not None and pixel_sha256(arr) != expected:
        warnings.warn(f"embedded image {name!r} differs from the one the split was defined with "
                      f"(pixel sha256 {pixel_sha256(arr)[:12]}... != {expected[:12]}...); results are "
                      "not comparable with runs on the reference image", stacklevel=2)
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to at most ``size x size`` (smaller sides are kept)."""
    h, w = arr.shape[:2]
    th, tw = min(h, size), min(w, size)
    top, left = (h - th) // 2, (w - tw) // 2
    return arr[top: top + th, left: left + tw]


class EmbeddedDataset(RestorationDataset):
    """The embedded images of one split as a :class:`RestorationDataset`.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``; or pass ``names`` explicitly.
        grey: single-channel variants (MATLAB rgb2gray, 8-bit).
        degradation: how LQ images are made (e.g. ``{"name": "gaussian_noise", "sigma": 25}``).
        seed: base seed for the degradation (per-image seeds derive from it and the name).
        crop: optional centre crop to at most ``crop x crop`` pixels (quick CPU runs).
    """

    def __init__(self, split: str = "test", grey: bool = False,
                 degradation: Degradation | Mapping[str, Any] | str | None = None, seed: int = 0,
                 crop: int | None = None, names: Sequence[str] | None = None,
                 same_seed_for_all: bool = False) -> None:
        super().__init__(degradation=degradation, seed=seed, same_seed_for_all=same_seed_for_all, cache=True)
        if names is None:
            if split not in SPLITS:
                raise KeyError(f"unknown embedded split {split!r}; known: {', '.join(SPLITS)}")
            names = SPLITS[split]
        unknown = [n for n in names if n not in _LOADERS]
        if unknown:
            raise KeyError(f"unknown embedded image(s) {unknown}; known: {', '.join(SPLITS['all'])}")
        if crop is not None and crop < 1:
            raise ValueError(f"crop must be a positive int or None, got {crop}")
        self.split, self.grey, self.crop = split, grey, crop
        self._names = list(names)
        self.dataset_name = f"embedded/{split}" + ("/grey" if grey else "")

    @property
    def names(self) -> list[str]:
        return self._names

    def _load(self, index: int) -> Sample:
        name = self._names[index]
        arr = load_embedded_uint8(name)
        if self.crop is not None:
            arr = center_crop(arr, self.crop)
        img = arr.astype(np.float32) / 255.0
        if self.grey:
            img = quantize_uint8(rgb_to_grey(img))
        return Sample(name=name, gt=img, meta={"source": _LOADERS[name].__name__})

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(split=self.split, grey=self.grey, crop=self.crop, names=self.names,
                 pixel_sha256={n: pixel_sha256(load_embedded_uint8(n)) for n in self.names})
        return d
