"""Training sampling: random aligned crops, 8-way flip/rotation, reflect padding of small images,
and an optional progressive patch/batch schedule (Restormer-style progressive learning).

:class:`PatchDataset` wraps any :class:`~harness.data.datasets.RestorationDataset`:

* Without ``online_degradation`` it crops aligned patches from the dataset's (stored or
  deterministically synthesised) LQ/GT pairs: LQ patch ``p // scale``, GT patch ``p``.
* With ``online_degradation`` (e.g. ``blind_gaussian_noise``) it crops the clean image and
  degrades the crop with a fresh seed per sample, so every epoch sees new noise.

Randomness is reproducible and independent of DataLoader workers: the generator for a sample is
seeded from ``(seed, sample_id)``. A plain integer key ``k`` uses ``sample_id = epoch * len + k``
(call :meth:`PatchDataset.set_epoch` before each epoch, with ``persistent_workers=False`` or in
the main process). :class:`ProgressiveBatchSampler` yields explicit ``(image, patch, sample_id)``
keys, which carry the patch size and id to the workers, so nothing needs to be mutated.

Each item is ``{"lq", "gt", "name", "degradation", "sample": {"sample_id", "top", "left",
"patch", "aug", "pad"}}`` so a batch can be regenerated exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .datasets import RestorationDataset
from .degrade import Degradation, derive_seed, make_degradation
from .imageio import to_tensor


def augment_8(img: np.ndarray | torch.Tensor, k: int) -> np.ndarray | torch.Tensor:
    """Apply dihedral transform ``k`` in 0..7: ``k & 3`` quarter turns (counter-clockwise), then a
    horizontal flip if ``k >= 4``. numpy arrays are ``(H, W, C)``; tensors ``(..., C, H, W)``."""
    if not 0 <= k < 8:
        raise ValueError(f"augmentation index must be in 0..7, got {k}")
    if isinstance(img, torch.Tensor):
        out = torch.rot90(img, k & 3, dims=(-2, -1))
        return out.flip(-1) if k >= 4 else out
    out = np.rot90(img, k & 3, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def inverse_augment_8(img: np.ndarray | torch.Tensor, k: int) -> np.ndarray | torch.Tensor:
    """Undo :func:`augment_8` with the same ``k``."""
    if isinstance(img, torch.Tensor):
        if k >= 4:
            img = img.flip(-1)
        return torch.rot90(img, -(k & 3), dims=(-2, -1))
    if k >= 4:
        img = img[:, ::-1]
    return np.ascontiguousarray(np.rot90(img, -(k & 3), axes=(0, 1)))


def reflect_pad(img: np.ndarray, pad_h: int, pad_w: int) -> np.ndarray:
    """Pad ``(H, W, C)`` at the bottom/right by mirror reflection without repeating the edge
    (``c b | a b c | b a``, OpenCV BORDER_REFLECT_101 / torch 'reflect'). Pads larger than the
    image are done in several reflections instead of failing."""
    while pad_h > 0 or pad_w > 0:
        h, w = img.shape[:2]
        ph = min(pad_h, h - 1) if h > 1 else 0
        pw = min(pad_w, w - 1) if w > 1 else 0
        if ph == 0 and pw == 0:  # 1-pixel dimension: nothing to reflect, repeat the edge
            img = np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            break
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        pad_h, pad_w = pad_h - ph, pad_w - pw
    return img


def pad_to_min_size(lq: np.ndarray, gt: np.ndarray, patch: int, scale: int
                    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Reflect-pad an LQ/GT pair whose GT is smaller than ``patch``; returns the LQ pad amounts."""
    lq_patch = patch // scale
    ph, pw = max(0, lq_patch - lq.shape[0]), max(0, lq_patch - lq.shape[1])
    if ph == 0 and pw == 0:
        return lq, gt, (0, 0)
    return reflect_pad(lq, ph, pw), reflect_pad(gt, ph * scale, pw * scale), (ph, pw)


def random_crop_pair(lq: np.ndarray, gt: np.ndarray, patch: int, scale: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Aligned random crop: GT ``patch x patch``, LQ ``patch/scale``; returns (lq, gt, top, left)
    with ``top``/``left`` in LQ pixels."""
    if patch % scale:
        raise ValueError(f"patch size {patch} is not a multiple of scale {scale}")
    lp = patch // scale
    h, w = lq.shape[:2]
    if h < lp or w < lp:
        raise ValueError(f"LQ image {h}x{w} smaller than LQ patch {lp} (pad it first)")
    top = int(rng.integers(0, h - lp + 1))
    left = int(rng.integers(0, w - lp + 1))
    return (lq[top: top + lp, left: left + lp],
            gt[top * scale: (top + lp) * scale, left * scale: (left + lp) * scale], top, left)


class PatchDataset(Dataset):
    """Random training patches from a full-image dataset.

    Args:
        base: the full-image dataset (its ``degradation`` is used when there is no online one).
        patch_size: GT patch side (LQ patch is ``patch_size // scale``).
        augment: random 8-way flip/rotation.
        online_degradation: degradation applied to each GT crop (fresh seed per sample).
        repeat: virtual epoch length = ``repeat * len(base)``.
        seed: base seed of all sampling randomness.
    """

    def __init__(self, base: RestorationDataset, patch_size: int, augment: bool = True,
                 online_degradation: Degradation | Mapping[str, Any] | str | None = None,
                 repeat: int = 1, seed: int = 0) -> None:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.base = base
        self.patch_size = int(patch_size)
        self.augment = augment
        self.online = make_degradation(online_degradation) if online_degradation is not None else None
        if self.online is not None and self.online.scale != 1:
            raise ValueError(f"online degradation {self.online.name!r} changes size (scale {self.online.scale}); "
                             "use it as the base dataset's degradation instead")
        self.repeat = int(repeat)
        self.seed = int(seed)
        self.epoch = 0
        self.scale = 1 if self.online is not None else base.scale
        # Deterministic (seeded-per-image) pairs are computed once per image and kept.
        self._pairs: dict[int, tuple[np.ndarray, np.ndarray, dict]] = {}

    def __len__(self) -> int:
        return len(self.base) * self.repeat

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _pair(self, image: int) -> tuple[np.ndarray, np.ndarray, dict]:
        if image not in self._pairs:
            sample = self.base.load(image)
            if self.online is not None:
                pair = (sample.gt, sample.gt, {})
            else:
                pair = self.base.degrade(sample)
            self._pairs[image] = pair
        return self._pairs[image]

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):
            k, patch = int(key[0]), int(key[1])
            sample_id = int(key[2]) if len(key) > 2 else self.epoch * len(self) + k
        else:
            k, patch = int(key), self.patch_size
            sample_id = self.epoch * len(self) + k
        image = k % len(self.base)
        rng = np.random.Generator(np.random.PCG64([self.seed, sample_id]))
        lq, gt, record = self._pair(image)
        lq, gt, pad = pad_to_min_size(lq, gt, patch, self.scale)
        lq, gt, top, left = random_crop_pair(lq, gt, patch, self.scale, rng)
        aug = int(rng.integers(0, 8)) if self.augment else 0
        lq, gt = augment_8(lq, aug), augment_8(gt, aug)
        if self.online is not None:
            lq, record = self.online(gt, derive_seed(self.seed, "online", sample_id))
        return {"lq": to_tensor(lq), "gt": to_tensor(gt), "name": self.base.names[image],
                "degradation": record,
                "sample": {"sample_id": sample_id, "top": top, "left": left, "patch": patch, "aug": aug,
                           "pad": list(pad)}}


@dataclass
class ProgressiveSchedule:
    """Patch/batch size by iteration. ``iters[i]`` is the length of stage i (Restormer style:
    ``iters=[92000, 64000, 48000, 36000, 36000, 24000]``, ``patch_sizes=[128, 160, 192, 256, 320,
    384]``, ``batch_sizes=[8, 5, 4, 2, 1, 1]``). After the last stage the last sizes continue."""

    iters: Sequence[int]
    patch_sizes: Sequence[int]
    batch_sizes: Sequence[int]

    def __post_init__(self) -> None:
        n = len(self.iters)
        if n == 0 or len(self.patch_sizes) != n or len(self.batch_sizes) != n:
            raise ValueError(f"progressive schedule needs equal non-empty lists, got iters={list(self.iters)}, "
                             f"patch_sizes={list(self.patch_sizes)}, batch_sizes={list(self.batch_sizes)}")
        if any(i <= 0 for i in self.iters) or any(b <= 0 for b in self.batch_sizes):
            raise ValueError("progressive schedule: iters and batch_sizes must be positive")

    @classmethod
    def constant(cls, patch_size: int, batch_size: int, total_iters: int) -> "ProgressiveSchedule":
        return cls([total_iters], [patch_size], [batch_size])

    @property
    def total_iters(self) -> int:
        return int(sum(self.iters))

    def at(self, iteration: int) -> tuple[int, int]:
        """(patch_size, batch_size) used at 0-based ``iteration``."""
        end = 0
        for it, p, b in zip(self.iters, self.patch_sizes, self.batch_sizes):
            end += it
            if iteration < end:
                return int(p), int(b)
        return int(self.patch_sizes[-1]), int(self.batch_sizes[-1])


class ProgressiveBatchSampler(Sampler):
    """Batch sampler for :class:`PatchDataset` following a :class:`ProgressiveSchedule`.

    Yields one list of ``(image_key, patch_size, sample_id)`` per iteration. Images are visited in
    seeded random permutations (every image once per pass); ``sample_id`` counts samples globally.
    Use as ``DataLoader(ds, batch_sampler=ProgressiveBatchSampler(...), collate_fn=collate_items)``.
    ``start_iter`` resumes mid-run with identical later batches.
    """

    def __init__(self, schedule: ProgressiveSchedule, num_images: int, total_iters: int | None = None,
                 seed: int = 0, start_iter: int = 0) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.schedule, self.num_images, self.seed = schedule, int(num_images), int(seed)
        self.total_iters = int(total_iters if total_iters is not None else schedule.total_iters)
        self.start_iter = int(start_iter)

    def __len__(self) -> int:
        return max(0, self.total_iters - self.start_iter)

    def _image_stream(self) -> Iterator[int]:
        rng = np.random.Generator(np.random.PCG64([self.seed, 0x5A3]))
        while True:
            yield from (int(i) for i in rng.permutation(self.num_images))

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        images = self._image_stream()
        sample_id = 0
        for it in range(self.total_iters):
            patch, batch = self.schedule.at(it)
            keys = [(next(images), patch, sample_id + j) for j in range(batch)]
            sample_id += batch
            if it >= self.start_iter:
                yield keys


def schedule_from_config(cfg: Mapping[str, Any] | None, patch_size: int, batch_size: int, total_iters: int
                         ) -> ProgressiveSchedule:
    """A schedule from a config dict (``iters``, ``patch_sizes``, ``batch_sizes``), or a constant one."""
    if not cfg:
        return ProgressiveSchedule.constant(patch_size, batch_size, total_iters)
    s = ProgressiveSchedule(list(cfg["iters"]), list(cfg["patch_sizes"]), list(cfg["batch_sizes"]))
    if s.total_iters != total_iters:
        # Scale stage lengths proportionally (short CPU runs of a long published schedule).
        frac = [i / s.total_iters for i in s.iters]
        iters = [max(1, int(math.floor(f * total_iters))) for f in frac]
        iters[-1] = max(1, total_iters - sum(iters[:-1]))
        s = ProgressiveSchedule(iters, s.patch_sizes, s.batch_sizes)
    return s
