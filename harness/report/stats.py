"""Statistics for comparisons: mean ± std over seeds, paired bootstrap CIs on per-image values."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a: list[float], b: list[float], *, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of the paired differences a - b with a bootstrap confidence interval over images.

    Resamples images (with replacement), so it says whether a gap between two models on the
    same images is larger than what the choice of images alone produces.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.size == 0:
        raise ValueError(f"paired values need equal, non-empty lengths, got {a_arr.size} and {b_arr.size}")
    diff = a_arr - b_arr
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean_diff": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(diff.size),
            "significant": bool(lo > 0 or hi < 0)}
