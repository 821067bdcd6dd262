"""Data for the harness: embedded default images, real benchmark readers, synthetic degradations,
training patch sampling and evaluation-time helpers.

Dataset items are dicts ``{"lq": (C, h, w) float32, "gt": (C, H, W) float32, "name": str,
"degradation": {"name", "params", "sampled", "seed"}}``; batch them with :func:`collate_items`.

Modules:

* :mod:`.embedded` -- :class:`EmbeddedDataset` (scikit-image/matplotlib photos, fixed split)
* :mod:`.degrade` -- :func:`make_degradation` and the registered degradations
* :mod:`.imresize` -- MATLAB bicubic :func:`imresize`
* :mod:`.folders` -- paired/single folders, list files, SIDD .mat blocks, :func:`open_benchmark`
* :mod:`.sampling` -- :class:`PatchDataset`, :class:`ProgressiveSchedule`, 8-way augmentation
* :mod:`.inference` -- :func:`pad_to_multiple`, :func:`tiled_forward`, :func:`self_ensemble`,
  :func:`restore`
* :mod:`.imageio` -- :func:`read_image`, :func:`write_image`, tensor conversion
* :mod:`.config` -- :func:`build_dataset` from a ``{"kind": ..., ...}`` config dict
* :mod:`.registry` -- the standard sets (layout, colour mode, split, source, per-file sha256)
* :mod:`.fetch` -- download + verify a registered set (``python -m harness.data fetch NAME --root DIR``)
"""

from .config import DATASET_KINDS, build_dataset
from .datasets import RestorationDataset, Sample, collate_items
from .degrade import (
    DEGRADATIONS,
    BicubicDown,
    BlindGaussianNoise,
    Chain,
    Degradation,
    GaussianBlur,
    GaussianNoise,
    Haze,
    Identity,
    JpegCompression,
    MotionBlur,
    derive_seed,
    gaussian_kernel,
    make_degradation,
    motion_kernel,
    synthetic_depth,
)
from .embedded import SPLITS as EMBEDDED_SPLITS
from .embedded import EmbeddedDataset, load_embedded_uint8
from .folders import (
    BENCHMARK_LAYOUTS,
    DatasetError,
    ListFileDataset,
    PairedFolderDataset,
    SIDDValidationDataset,
    SingleFolderDataset,
    open_benchmark,
    read_list_file,
)
from .imageio import ImageReadError, list_images, read_image, rgb_to_grey, to_numpy, to_tensor, write_image
from .imresize import imresize, modcrop
from .inference import crop_output, describe_inference, pad_to_multiple, restore, self_ensemble, tiled_forward
from .sampling import (
    PatchDataset,
    ProgressiveBatchSampler,
    ProgressiveSchedule,
    augment_8,
    inverse_augment_8,
    random_crop_pair,
    reflect_pad,
    schedule_from_config,
)

__all__ = [
    "build_dataset", "DATASET_KINDS",
    "RestorationDataset", "Sample", "collate_items",
    "DEGRADATIONS", "Degradation", "Identity", "GaussianNoise", "BlindGaussianNoise", "BicubicDown",
    "GaussianBlur", "MotionBlur", "Haze", "JpegCompression", "Chain", "make_degradation", "derive_seed", "gaussian_kernel",
    "motion_kernel", "synthetic_depth",
    "EmbeddedDataset", "EMBEDDED_SPLITS", "load_embedded_uint8",
    "PairedFolderDataset", "SingleFolderDataset", "ListFileDataset", "SIDDValidationDataset",
    "open_benchmark", "read_list_file", "BENCHMARK_LAYOUTS", "DatasetError",
    "read_image", "write_image", "list_images", "rgb_to_grey", "to_tensor", "to_numpy", "ImageReadError",
    "imresize", "modcrop",
    "pad_to_multiple", "crop_output", "tiled_forward", "self_ensemble", "restore", "describe_inference",
    "PatchDataset", "ProgressiveSchedule", "ProgressiveBatchSampler", "augment_8", "inverse_augment_8",
    "random_crop_pair", "reflect_pad", "schedule_from_config",
]
