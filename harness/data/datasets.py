"""Base class for full-image restoration datasets and the batch collate function.

An item is a dict::

    {"lq": Tensor (C, h, w) float32,      # in [0, 1], or unclipped after Gaussian noise
     "gt": Tensor (C, H, W) float32,      # in [0, 1]; H = scale * h
     "name": str,                         # image name (file stem / embedded name / SIDD block id)
     "degradation": dict}                 # how lq was made: {"name", "params", "sampled", "seed"}

Subclasses implement :meth:`RestorationDataset.load` returning a :class:`Sample` with the clean
image and, for paired data, the stored LQ image. When a sample has no LQ image the dataset's
degradation synthesises one with a per-image seed (``derive_seed(seed, name)``, or ``seed`` itself
for every image when ``same_seed_for_all=True``, the EAMamba/Restormer test-script habit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .degrade import Degradation, derive_seed, make_degradation
from .imageio import to_tensor
from .imresize import modcrop


@dataclass
class Sample:
    """One loaded image (numpy float32 HWC). ``lq`` is None for clean-only sources."""

    name: str
    gt: np.ndarray
    lq: np.ndarray | None = None
    record: dict[str, Any] | None = None  # degradation record of a stored LQ image
    meta: dict[str, Any] = field(default_factory=dict)


class RestorationDataset(Dataset):
    """Full-image dataset: paired samples pass through, clean samples get ``degradation``.

    Args:
        degradation: degradation (or config dict / name) used for samples without a stored LQ.
        seed: base seed for synthetic degradations.
        same_seed_for_all: use ``seed`` itself for every image instead of a per-name seed.
        cache: keep loaded samples in memory (fine for small sets; the embedded set always does).
    """

    #: Human-readable dataset name, recorded in results.
    dataset_name: str = "dataset"

    def __init__(self, degradation: Degradation | Mapping[str, Any] | str | None = None, seed: int = 0,
                 same_seed_for_all: bool = False, cache: bool = False) -> None:
        self.degradation = make_degradation(degradation) if degradation is not None else None
        self.seed = int(seed)
        self.same_seed_for_all = bool(same_seed_for_all)
        self.cache = cache
        self._cache: dict[int, Sample] = {}
        self._item_cache: dict[int, dict[str, Any]] = {}

    # -- to implement --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        raise NotImplementedError

    def _load(self, index: int) -> Sample:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    @property
    def scale(self) -> int:
        """gt size / lq size for this dataset's samples."""
        return self.degradation.scale if self.degradation is not None else 1

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Sample:
        """Load sample ``index`` (numpy, undegraded), using the in-memory cache if enabled."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.dataset_name}: index {index} out of range (0..{len(self) - 1})")
        if index in self._cache:
            return self._cache[index]
        s = self._load(index)
        if self.cache:
            self._cache[index] = s
        return s

    def seed_for(self, name: str) -> int:
        return self.seed if self.same_seed_for_all else derive_seed(self.seed, name)

    def degrade(self, sample: Sample) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(lq, gt, record) for a sample: the stored pair, or gt through the degradation."""
        if sample.lq is not None:
            record = sample.record or {"name": "stored_pair", "params": {}, "sampled": {}, "seed": -1}
            return sample.lq, sample.gt, record
        if self.degradation is None:
            raise ValueError(f"{self.dataset_name}: sample {sample.name!r} has no LQ image and the "
                             "dataset has no degradation configured")
        gt = sample.gt
        if self.degradation.scale > 1:
            gt = modcrop(gt, self.degradation.scale)  # LR size must divide exactly
        lq, record = self.degradation(gt, self.seed_for(sample.name))
        return lq, gt, record

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index in self._item_cache:
            item = self._item_cache[index]
            return {**item, "lq": item["lq"].clone(), "gt": item["gt"].clone()}
        sample = self.load(index)
        lq, gt, record = self.degrade(sample)
        item = {"lq": to_tensor(lq), "gt": to_tensor(gt), "name": sample.name, "degradation": record}
        if self.cache:
            self._item_cache[index] = item
            return {**item, "lq": item["lq"].clone(), "gt": item["gt"].clone()}
        return item

    def source_files(self) -> list[tuple[str, Path]]:
        """(label, path) of every file the dataset reads; the label does not depend on where the
        data root is (e.g. ``"gt/01.png"``). Empty for sources that are not files on disk."""
        return []

    def digest(self) -> dict[str, Any] | None:
        """``{"sha256", "files"}``: one sha256 over every source file's label and content hash,
        so two evaluations read the same data exactly when their digests agree. None when the
        dataset reads no files (embedded photos)."""
        files = sorted(self.source_files())
        if not files:
            return None
        if getattr(self, "_digest", None) is None:  # hashed once per dataset object
            total = hashlib.sha256()
            for label, path in files:
                total.update(f"{file_sha256(path)}  {label}\n".encode())
            self._digest = {"sha256": total.hexdigest(), "files": len(files)}
        return self._digest

    def describe(self) -> dict[str, Any]:
        """JSON-able description for result files."""
        return {"dataset": self.dataset_name, "size": len(self), "scale": self.scale, "seed": self.seed,
                "same_seed_for_all": self.same_seed_for_all,
                "degradation": self.degradation.spec() if self.degradation is not None else None,
                "files_digest": self.digest()}


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collate_items(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate dataset items: stack ``lq``/``gt`` (sizes must match), keep other keys as lists.

    Use this instead of torch's default collate: degradation records hold ``None`` params and
    per-image ``sampled`` values, which the default collate cannot (and should not) stack.
    """
    if not batch:
        raise ValueError("collate_items: empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                names = [b.get("name", "?") for b in batch]
                raise ValueError(f"collate_items: cannot stack {key!r} of different shapes {sorted(shapes)} "
                                 f"(images {names}); use batch_size=1 for full images")
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out
