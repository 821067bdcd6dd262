"""Restormer (Zamir et al., CVPR 2022): the 4-level U-Net with transposed (channel) attention.

The skeleton (``patch_embed``, ``encoder_level1`` ... ``refinement``, ``output``) is the shared
``RestormerUNet``, whose names are Restormer's own; this file adds the Transformer block:
multi-Dconv head transposed attention (MDTA) and the gated-Dconv FFN (GDFN, shared with
EAMamba's ablations). Official checkpoints (``{'params': state_dict}``) load strictly.

Norms: ``BiasFree`` for every denoising config (colour, grey, real), ``WithBias`` for
deraining and motion/defocus deblurring.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.models.layers import GDFN, ChannelLayerNorm
from harness.models.unet import RestormerUNet


class MDTA(nn.Module):
    """Channel attention: per head, softmax(temperature * q̂ k̂ᵀ) over (C/heads x C/heads), then · v.

    q̂, k̂ are L2-normalised along the pixels, so the cost is linear in H·W. The matmuls are
    written out (no ``scaled_dot_product_attention``) so that FLOP counters see them.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the channels ({dim})")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)  # 3 x (B, C, H, W)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))  # (B, h, C/h, L)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, h, C/h, C/h)
        out = attn.softmax(dim=-1) @ v  # (B, h, C/h, L)
        return self.project_out(out.reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    """x + MDTA(norm1(x)), then x + GDFN(norm2(x)), on (B, C, H, W) maps."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float = 2.66, bias: bool = False,
                 norm_type: str = "WithBias"):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, norm_type)
        self.attn = MDTA(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, norm_type)
        self.ffn = GDFN(dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Restormer(RestormerUNet):
    """(B, in_channels, H, W) -> (B, out_channels, H, W); H and W multiples of 8.

    ``heads[level]`` attention heads per level; decoder level 1 and the refinement use
    ``heads[0]`` although they run at 2·dim channels, as released.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        norm_type: str = "WithBias",
        dual_pixel_task: bool = False,
    ):
        if len(heads) != 4:
            raise ValueError(f"heads must give 4 per-level head counts, got {list(heads)}")
        heads = tuple(int(n) for n in heads)
        super().__init__(
            lambda channels, level: TransformerBlock(channels, heads[level], ffn_expansion_factor, bias, norm_type),
            in_channels, out_channels, dim, num_blocks, num_refinement_blocks, bias, dual_pixel_task,
        )
