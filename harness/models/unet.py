"""The 4-level Restormer-layout U-Net shared by EAMamba, Restormer and MambaIR-UNet.

Only the block differs between those networks, so the skeleton takes a block factory
``make_block(channels, level)``; level 0..3 is the depth (decoder level 1 and the refinement
run at 2·dim but count as level 0, as in the releases, e.g. for Restormer's per-level heads).
Module names match the releases: ``patch_embed``, ``encoder_level1`` … ``output``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from harness.models.layers import Downsample, OverlapPatchEmbed, Upsample

BlockFactory = Callable[[int, int], nn.Module]


def _stage(make_block: BlockFactory, count: int, channels: int, level: int) -> nn.Sequential:
    return nn.Sequential(*[make_block(channels, level) for _ in range(count)])


class RestormerUNet(nn.Module):
    """Encoder (3 downsamplings), latent, decoder with skip concatenations, refinement.

    Input (B, in_channels, H, W) with H, W multiples of 8; output (B, out_channels, H, W).
    The output adds the input (global residual) unless ``dual_pixel_task``.
    """

    pad_multiple = 8

    def __init__(
        self,
        make_block: BlockFactory,
        in_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        bias: bool = False,
        dual_pixel_task: bool = False,
    ):
        super().__init__()
        if len(num_blocks) != 4 or any(int(n) < 1 for n in num_blocks):
            raise ValueError(f"num_blocks must be 4 positive counts, got {list(num_blocks)}")
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be a positive even number, got {dim}")
        if num_refinement_blocks < 0:
            raise ValueError(f"num_refinement_blocks must be >= 0, got {num_refinement_blocks}")
        if not dual_pixel_task and in_channels != out_channels:
            raise ValueError(
                f"the global residual needs in_channels == out_channels, got {in_channels} and {out_channels}"
            )
        n1, n2, n3, n4 = (int(n) for n in num_blocks)
        self.dual_pixel_task = dual_pixel_task
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, bias=False)
        self.encoder_level1 = _stage(make_block, n1, dim, 0)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = _stage(make_block, n2, dim * 2, 1)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = _stage(make_block, n3, dim * 4, 2)
        self.down3_4 = Downsample(dim * 4)
        self.latent = _stage(make_block, n4, dim * 8, 3)
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = _stage(make_block, n3, dim * 4, 2)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = _stage(make_block, n2, dim * 2, 1)
        self.up2_1 = Upsample(dim * 2)
        # Level 1 keeps the concatenated 2·dim channels: no reduction conv, as released.
        self.decoder_level1 = _stage(make_block, n1, dim * 2, 0)
        self.refinement = _stage(make_block, num_refinement_blocks, dim * 2, 0)
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(
                f"{type(self).__name__} needs H and W divisible by 8, got {tuple(x.shape[-2:])}; "
                "pad the input (harness.data pads to the model's multiple)"
            )
        emb = self.patch_embed(x)  # (B, C, H, W)
        enc1 = self.encoder_level1(emb)
        enc2 = self.encoder_level2(self.down1_2(enc1))  # (B, 2C, H/2, W/2)
        enc3 = self.encoder_level3(self.down2_3(enc2))  # (B, 4C, H/4, W/4)
        lat = self.latent(self.down3_4(enc3))  # (B, 8C, H/8, W/8)
        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(lat), enc3], 1)))
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1)))
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1))  # (B, 2C, H, W)
        dec1 = self.refinement(dec1)
        if self.dual_pixel_task:
            return self.output(dec1 + self.skip_conv(emb))
        return self.output(dec1) + x
