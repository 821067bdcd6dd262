"""BM3D / CBM3D (Dabov et al., TIP 2007) as a model: the classical row of denoising tables.

The filtering is the ``bm3d`` package (Mäkinen, Azzari and Foi; ``bm3d.bm3d`` for grey images,
``bm3d.bm3d_rgb`` for colour, which denoises in the opponent colour space as CBM3D does). Its
licence allows non-commercial use only, so it is an optional extra, never a default dependency::

    pip install -e .[classical]

The module has no parameters; it runs each image of a batch on the CPU in float64 and returns a
tensor on the input's device, so evaluation, timing and reports treat it like any network.
σ (0..255 scale) comes from the task (the preset reads ``degradation.sigma``) or per call, as for
FDnCNN/FFDNet; the package is told σ/255 because images are in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .noise_map import Sigma

PROFILES = ("np", "refilter", "vn", "high", "deb")


def _package():
    try:
        import bm3d
    except ImportError as err:
        raise ImportError("BM3D needs the optional 'bm3d' package (non-commercial licence): "
                          "pip install -e .[classical]") from err
    return bm3d


class BM3D(nn.Module):
    """(B, C, H, W) noisy images in [0, 1] (C = 1: BM3D, C = 3: CBM3D) -> denoised, same shape."""

    pad_multiple = 1
    takes_noise_level = True

    def __init__(self, in_nc: int = 1, noise_level: float | None = None, profile: str = "np") -> None:
        super().__init__()
        if in_nc not in (1, 3):
            raise ValueError(f"BM3D: in_nc must be 1 (grey) or 3 (colour), got {in_nc}")
        if profile not in PROFILES:
            raise ValueError(f"BM3D: profile must be one of {PROFILES}, got {profile!r}")
        self.in_nc, self.noise_level, self.profile = in_nc, noise_level, profile

    def forward(self, x: torch.Tensor, sigma: Sigma = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_nc:
            raise ValueError(f"BM3D: expected (B, {self.in_nc}, H, W), got {tuple(x.shape)}")
        sigma = self.noise_level if sigma is None else sigma
        if sigma is None:
            raise ValueError("BM3D needs the noise level σ (0..255 scale): call model(x, sigma=25), set "
                             "model.noise_level, or run it on a task with a Gaussian noise degradation")
        sigmas = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        bm3d = _package()
        out = []
        for image, s in zip(x.detach().cpu().double().numpy(), sigmas.tolist()):
            if self.in_nc == 1:
                y = bm3d.bm3d(image[0], sigma_psd=s / 255.0, profile=self.profile)[None]
            else:
                y = np.transpose(bm3d.bm3d_rgb(np.transpose(image, (1, 2, 0)), sigma_psd=s / 255.0,
                                               profile=self.profile), (2, 0, 1))
            out.append(np.ascontiguousarray(y))
        return torch.from_numpy(np.stack(out)).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"in_nc={self.in_nc}, noise_level={self.noise_level}, profile={self.profile!r}"
