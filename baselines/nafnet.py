"""NAFNet (Chen et al., ECCV 2022): a nonlinear-activation-free U-Net of NAFBlocks.

Module and parameter names follow the release (``basicsr/models/archs/NAFNet_arch.py``):
``intro``, ``encoders.i.j``, ``downs.i``, ``middle_blks.j``, ``ups.i.0``, ``decoders.i.j``,
``ending``; inside a block ``beta``, ``gamma``, ``conv1``..``conv5``, ``sca.1``, ``norm1``,
``norm2``. Official checkpoints (``{'params': state_dict}``) load strictly.

Optionally the Test-time Local Converter (TLC, used for the published GoPro results): the
simplified channel attention's global average pool becomes a local average over a window
that is ``tlc_base_size / tlc_train_size`` times the training patch (1.5 x by default),
which matters only on test images larger than that window. Same weights, no new parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6.

    The release implements this as a custom autograd Function; here it is written with
    elementary ops, so FLOP counters in the papers' convention charge it nothing either way.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: (B, 2C, H, W) -> (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class LocalAvgPool2d(nn.Module):
    """TLC pooling: mean over a ``kernel`` x ``kernel`` window around each pixel.

    Falls back to the global mean when the window covers the map (so at training sizes it is
    the plain NAFNet). Border outputs repeat the nearest full-window value, as in the release.
    """

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = int(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.kernel >= h and self.kernel >= w:
            return F.adaptive_avg_pool2d(x, 1)
        k1, k2 = min(h, self.kernel), min(w, self.kernel)
        s = F.pad(x.cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # integral image, (B, C, H+1, W+1)
        out = (s[..., k1:, k2:] + s[..., :-k1, :-k2] - s[..., :-k1, k2:] - s[..., k1:, :-k2]) / (k1 * k2)
        oh, ow = out.shape[-2:]  # (H-k1+1, W-k2+1) -> pad back to (H, W)
        pad = ((w - ow) // 2, (w - ow + 1) // 2, (h - oh) // 2, (h - oh + 1) // 2)
        return F.pad(out, pad, mode="replicate")


class NAFBlock(nn.Module):
    """Two residual halves, each scaled by a learnt per-channel factor (initialised to 0):

    y = x + beta * conv3(SCA(SG(dwconv(conv1(LN(x))))));  out = y + gamma * conv5(SG(conv4(LN(y)))).
    """

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, pool: nn.Module | None = None):
        super().__init__()
        dw_channel = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw_channel, 1, bias=True)
        self.conv2 = nn.Conv2d(dw_channel, dw_channel, 3, padding=1, groups=dw_channel, bias=True)
        self.conv3 = nn.Conv2d(dw_channel // 2, c, 1, bias=True)
        # Simplified channel attention: global (or TLC local) average, then a 1x1 conv, no gate.
        self.sca = nn.Sequential(
            pool if pool is not None else nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dw_channel // 2, dw_channel // 2, 1, bias=True),
        )
        self.sg = SimpleGate()
        ffn_channel = ffn_expand * c
        self.conv4 = nn.Conv2d(c, ffn_channel, 1, bias=True)
        self.conv5 = nn.Conv2d(ffn_channel // 2, c, 1, bias=True)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        # Zero init: every block starts as the identity, which the release relies on for depth.
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(self.norm1(inp)))  # (B, C, H, W) -> (B, 2C, H, W)
        x = self.sg(x)  # -> (B, C, H, W)
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))  # (B, 2C) -> (B, C) -> (B, C)
        return y + x * self.gamma


class NAFNet(nn.Module):
    """(B, img_channel, H, W) -> same shape; pads internally to a multiple of 2**len(enc_blk_nums)."""

    pad_multiple = 16  # the released configs have 4 encoder levels

    def __init__(
        self,
        img_channel: int = 3,
        width: int = 32,
        middle_blk_num: int = 12,
        enc_blk_nums: Sequence[int] = (2, 2, 4, 8),
        dec_blk_nums: Sequence[int] = (2, 2, 2, 2),
        tlc_base_size: int | None = None,
        tlc_train_size: int = 256,
    ):
        super().__init__()
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(f"enc_blk_nums and dec_blk_nums need the same length, got {list(enc_blk_nums)} "
                             f"and {list(dec_blk_nums)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        levels = len(enc_blk_nums)

        def pool(level: int) -> nn.Module | None:
            # TLC window at this level: base_size in input pixels, divided by the level's stride.
            if tlc_base_size is None:
                return None
            return LocalAvgPool2d((tlc_train_size >> level) * tlc_base_size // tlc_train_size)

        self.intro = nn.Conv2d(img_channel, width, 3, padding=1, bias=True)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1, bias=True)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.middle_blks = nn.Sequential()  # filled below; created here to keep the release's key order
        self.ups = nn.ModuleList()
        self.downs = nn.ModuleList()
        chan = width
        for level, num in enumerate(enc_blk_nums):
            self.encoders.append(nn.Sequential(*[NAFBlock(chan, pool=pool(level)) for _ in range(int(num))]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))  # (C, H, W) -> (2C, H/2, W/2)
            chan *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(chan, pool=pool(levels)) for _ in range(int(middle_blk_num))])
        for i, num in enumerate(dec_blk_nums):
            level = levels - 1 - i
            # (C, H, W) -> (2C, H, W) -> PixelShuffle -> (C/2, 2H, 2W)
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan, pool=pool(level)) for _ in range(int(num))]))
        self.padder_size = 2 ** levels
        self.pad_multiple = self.padder_size

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        _, _, h, w = inp.shape
        inp = self._pad(inp)
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip)  # additive skips, not concatenation
        x = self.ending(x) + inp
        return x[:, :, :h, :w]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right to a multiple of the total downsampling, as the release does."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.padder_size, (-w) % self.padder_size
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x
