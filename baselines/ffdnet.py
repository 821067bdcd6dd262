"""FFDNet (Zhang, Zuo and Zhang, TIP 2018): a fast non-blind denoiser on the 2x2 pixel-unshuffled image.

The image (odd height/width padded by repeating the last row/column, as the authors' test
scripts do) is rearranged into four half-resolution sub-images per channel, a noise-level map
(σ/255, one channel at half resolution) is concatenated after them, a plain conv+ReLU stack
maps that to four sub-images per output channel, and pixel shuffle puts them back: the output is
the clean image itself, cropped to the input size.

Sizes of the releases (cszn/FFDNet ``models/FFDNet_{gray,color}.mat``): grey 64 channels and
15 convolutions, colour 96 channels and 12 convolutions. Layers sit in ``model`` (convolutions
at even indices), like :class:`baselines.dncnn.DnCNN`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dncnn import plain_body
from .noise_map import Sigma, noise_level_map


class FFDNet(nn.Module):
    """(B, in_nc, H, W) plus σ -> clean (B, out_nc, H, W), any H and W.

    ``sigma`` in ``forward`` (or ``noise_level`` when it is None) is on the 0..255 scale; a
    per-pixel map must have the half-resolution size ``(B, 1, ceil(H/2), ceil(W/2))``.
    """

    pad_multiple = 1  # odd sizes are padded inside forward, the way the authors pad them
    takes_noise_level = True

    def __init__(self, in_nc: int = 1, out_nc: int = 1, nc: int = 64, nb: int = 15, act_mode: str = "R",
                 noise_level: float | None = None):
        super().__init__()
        self.in_nc = in_nc
        self.noise_level = noise_level
        self.model = plain_body(4 * in_nc + 1, 4 * out_nc, nc, nb, act_mode)

    def forward(self, x: torch.Tensor, sigma: Sigma = None) -> torch.Tensor:
        if x.shape[1] != self.in_nc:
            raise ValueError(f"FFDNet expects {self.in_nc} image channel(s), got input of shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        # Replicate the last row/column of an odd-sized image (Demo_AWGN_*.m), crop it off after.
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else x
        sub = F.pixel_unshuffle(x, 2)
        sigma_map = noise_level_map(sub, sigma, self.noise_level, "FFDNet")
        out = F.pixel_shuffle(self.model(torch.cat((sub, sigma_map), dim=1)), 2)
        return out[..., :h, :w]
