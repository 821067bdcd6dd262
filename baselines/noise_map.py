"""The noise-level map fed to non-blind denoisers (FDnCNN, FFDNet) beside the image.

σ is given on the 0..255 scale, as tasks write it (``gaussian_noise`` with ``sigma: 25``); the
networks were trained on images in [0, 1] with a map of σ/255 (the authors' scripts set
``sigmas = inputNoiseSigma/255``), so the map holds σ/255.

σ reaches a model in one of two ways: per call, ``model(x, sigma=25)`` (a number, a (B,) tensor,
or a (B, 1, H, W) map for spatially varying noise), or as the model's ``noise_level`` (set from
the preset, whose config reads the task's σ). A call with neither is an error: a guessed σ
would silently give wrong numbers.
"""

from __future__ import annotations

import torch

Sigma = float | int | torch.Tensor | None


def noise_level_map(x: torch.Tensor, sigma: Sigma, default: float | None, model_name: str) -> torch.Tensor:
    """(B, 1, H, W) map of σ/255 for input ``x`` (B, C, H, W); ``sigma`` wins over ``default``."""
    if sigma is None:
        sigma = default
    if sigma is None:
        raise ValueError(
            f"{model_name} needs the noise level σ (0..255 scale) as an input: call model(x, sigma=25), set "
            f"model.noise_level, or run it on a task with a Gaussian noise degradation (degradation.sigma)")
    b, _, h, w = x.shape
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.tensor(float(sigma))
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    if sigma.dim() == 0 or sigma.shape == (b,):
        sigma_map = sigma.reshape(-1, 1, 1, 1).expand(b, 1, h, w)
    elif sigma.dim() == 4 and sigma.shape[1] == 1 and sigma.shape[-2:] == (h, w) and sigma.shape[0] in (1, b):
        sigma_map = sigma.expand(b, 1, h, w)
    else:
        raise ValueError(f"{model_name}: sigma must be a number, a ({b},) tensor or a ({b}, 1, {h}, {w}) map; "
                         f"got shape {tuple(sigma.shape)}")
    if bool((sigma_map < 0).any()):
        raise ValueError(f"{model_name}: the noise level σ must be >= 0")
    return sigma_map / 255.0
