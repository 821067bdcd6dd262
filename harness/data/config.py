"""Build a dataset from a plain config dict (what a Hydra/YAML ``data`` node holds).

``kind`` selects the reader; the remaining keys are its arguments::

    {"kind": "embedded", "split": "test", "grey": False, "crop": None,
     "degradation": {"name": "gaussian_noise", "sigma": 25}, "seed": 0}
    {"kind": "benchmark", "root": "/data/test", "name": "CBSD68",
     "degradation": {"name": "gaussian_noise", "sigma": 50}}
    {"kind": "benchmark", "root": "/data/sr", "name": "Set5", "scale": 4}
    {"kind": "paired", "lq_dir": ".../LR/X4", "gt_dir": ".../HR", "scale": 4, "lq_template": "{}x4"}
    {"kind": "folder", "folder": ".../Kodak24", "degradation": {...}}
    {"kind": "list", "gt_list": "gt.txt", "lq_list": "lq.txt", "root": "/data"}
    {"kind": "sidd", "root": "/data/SIDD"}
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .datasets import RestorationDataset
from .embedded import EmbeddedDataset
from .folders import ListFileDataset, PairedFolderDataset, SIDDValidationDataset, SingleFolderDataset, open_benchmark

DATASET_KINDS = {
    "embedded": EmbeddedDataset,
    "benchmark": open_benchmark,
    "paired": PairedFolderDataset,
    "folder": SingleFolderDataset,
    "list": ListFileDataset,
    "sidd": SIDDValidationDataset,
}


def build_dataset(cfg: Mapping[str, Any]) -> RestorationDataset:
    """Dataset from ``{"kind": ..., **arguments}``; unknown kinds/arguments name the problem."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", "embedded")
    if kind not in DATASET_KINDS:
        raise KeyError(f"unknown dataset kind {kind!r}; known: {', '.join(DATASET_KINDS)}")
    cfg = {k: _plain(v) for k, v in cfg.items()}
    try:
        return DATASET_KINDS[kind](**cfg)
    except TypeError as e:
        raise TypeError(f"bad arguments for dataset kind {kind!r}: {sorted(cfg)} ({e})") from e


def _plain(obj: Any) -> Any:
    """OmegaConf DictConfig/ListConfig (or any mapping/sequence) -> dict/list, so degradation
    records stay JSON-able."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj
