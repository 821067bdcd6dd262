"""DnCNN (Zhang et al., TIP 2017), laid out as KAIR's ``models/network_dncnn.py``.

The network predicts the noise and subtracts it: ``out = x - model(x)``. Layers sit in one flat
``nn.Sequential`` called ``model`` so the released checkpoints (plain state dicts, keys
``model.{0,2,4,...}.weight/bias``) load strictly:

- ``act_mode="R"`` (released weights, batch norm folded into the convolutions):
  conv+ReLU, (nb-2) x (conv+ReLU), conv -> convs at the even indices, ReLUs at the odd ones;
- ``act_mode="BR"`` (training-time form): conv+ReLU, (nb-2) x (conv+BN+ReLU), conv, with
  KAIR's BatchNorm settings (eps 1e-4, momentum 0.9).

Grey sigma-specific models use nb = 17 (555,137 parameters), the blind models (DnCNN-B, CDnCNN-B,
DnCNN-3) nb = 20.

:class:`FDnCNN` is the authors' non-blind variant (cszn/DnCNN ``Demo_FDnCNN_*.m``): the same
20-layer body fed the image and a noise-level map (σ/255, one channel, concatenated after the
image channels), and it outputs the clean image directly (no residual subtraction).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .noise_map import Sigma, noise_level_map

ACT_MODES = ("R", "BR")


class DnCNN(nn.Module):
    """Residual denoiser: (B, in_nc, H, W) -> (B, out_nc, H, W), any H and W."""

    pad_multiple = 1

    def __init__(self, in_nc: int = 1, out_nc: int = 1, nc: int = 64, nb: int = 17, act_mode: str = "R"):
        super().__init__()
        if in_nc != out_nc:
            raise ValueError(f"the residual output needs in_nc == out_nc, got {in_nc} and {out_nc}")
        self.model = plain_body(in_nc, out_nc, nc, nb, act_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.model(x)  # the body estimates the noise


def plain_body(in_nc: int, out_nc: int, nc: int, nb: int, act_mode: str) -> nn.Sequential:
    """conv+ReLU, (nb-2) x (conv[+BN]+ReLU), conv: DnCNN's body, convolutions at even indices."""
    if act_mode not in ACT_MODES:
        raise ValueError(f"act_mode must be one of {list(ACT_MODES)}, got {act_mode!r}")
    if nb < 2:
        raise ValueError(f"nb (number of conv layers) must be >= 2, got {nb}")
    layers: list[nn.Module] = [nn.Conv2d(in_nc, nc, 3, padding=1, bias=True), nn.ReLU(inplace=True)]
    for _ in range(nb - 2):
        layers.append(nn.Conv2d(nc, nc, 3, padding=1, bias=True))
        if act_mode == "BR":
            # KAIR's BatchNorm: eps 1e-4 and momentum 0.9 (a fast-moving running average).
            layers.append(nn.BatchNorm2d(nc, eps=1e-4, momentum=0.9))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Conv2d(nc, out_nc, 3, padding=1, bias=True))
    return nn.Sequential(*layers)


class FDnCNN(nn.Module):
    """Non-blind DnCNN: (B, in_nc, H, W) plus σ -> clean (B, out_nc, H, W), any H and W.

    ``noise_level`` (0..255 scale) is used when ``forward`` gets no ``sigma``; see
    :mod:`baselines.noise_map`.
    """

    pad_multiple = 1
    takes_noise_level = True

    def __init__(self, in_nc: int = 1, out_nc: int = 1, nc: int = 64, nb: int = 20, act_mode: str = "R",
                 noise_level: float | None = None):
        super().__init__()
        self.in_nc = in_nc
        self.noise_level = noise_level
        self.model = plain_body(in_nc + 1, out_nc, nc, nb, act_mode)

    def forward(self, x: torch.Tensor, sigma: Sigma = None) -> torch.Tensor:
        if x.shape[1] != self.in_nc:
            raise ValueError(f"FDnCNN expects {self.in_nc} image channel(s), got input of shape {tuple(x.shape)}")
        sigma_map = noise_level_map(x, sigma, self.noise_level, "FDnCNN")
        return self.model(torch.cat((x, sigma_map), dim=1))
