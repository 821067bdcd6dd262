"""MambaIR (Guo et al., ECCV 2024) and MambaIR-UNet: restoration with VMamba's 2D selective scan.

Read top to bottom: the SS2D token mixer, the channel-attention block (CAB), the Residual
State-Space Block (``VSSBlock``), the SwinIR-style network (``MambaIR``: colour/grey denoising,
JPEG artefacts, classic and lightweight SR) and the Restormer-layout ``MambaIRUNet`` (real
denoising). Parameter names are the release's, so its checkpoints load strictly.

SS2D is the shared multi-route scan with ``merge="add"``: four routes, each over all
``d_inner`` channels with its own projections, outputs summed. The route order is VMamba's
CrossScan order, row, column, row reversed, column reversed, and it matters: slice k of
``x_proj_weight`` / ``dt_projs_*`` / ``A_logs`` / ``Ds`` belongs to route k.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.models.eamamba import init_ssm_parameters
from harness.models.layers import init_transformer_weights
from harness.models.unet import RestormerUNet
from harness.ops.route_scan import multi_route_scan

# VMamba's CrossScan order (x_proj_weight[k] belongs to route k): not EAMamba's `cross` order.
SS2D_ROUTES = ("h", "v", "h_rev", "v_rev")
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, subtracted by the SwinIR-style models
UPSAMPLERS = ("", "pixelshuffle", "pixelshuffledirect")


class SS2D(nn.Module):
    """2D selective scan on a channels-last map: (B, H, W, C) -> (B, H, W, C).

    in_proj -> (x, z); x: depthwise 3x3 conv + SiLU -> 4-route scan (summed) -> out_norm;
    times SiLU(z) -> out_proj. d_inner = int(expand·C), dt_rank = ceil(C / 16).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2.0,
                 scan_backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state = d_model, int(d_state)
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        # Direct parameters first: their order is the release's state-dict order.
        for name, value in init_ssm_parameters(len(SS2D_ROUTES), self.d_inner, self.dt_rank, self.d_state).items():
            self.register_parameter(name, nn.Parameter(value))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=False)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, d_conv, padding=(d_conv - 1) // 2,
                                groups=self.d_inner, bias=True)
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        xin, z = self.in_proj(x).chunk(2, dim=-1)  # 2 x (B, H, W, d_inner)
        xin = F.silu(self.conv2d(xin.permute(0, 3, 1, 2).contiguous()))  # (B, d_inner, H, W)
        y = multi_route_scan(
            xin, SS2D_ROUTES, "add", self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
            self.A_logs, self.Ds, self.scan_backend,
        )  # (B, d_inner, H·W), raster order
        y = self.out_norm(y.transpose(1, 2).reshape(b, h, w, self.d_inner))  # (B, H, W, d_inner)
        return self.out_proj(y * F.silu(z))


class ChannelAttention(nn.Module):
    """RCAN's squeeze-and-excitation: x · sigmoid(conv(relu(conv(mean_HW(x)))))."""

    def __init__(self, num_feat: int, squeeze_factor: int = 16):
        super().__init__()
        if num_feat // squeeze_factor < 1:
            raise ValueError(f"channel attention squeezes {num_feat} channels by {squeeze_factor} to zero; "
                             f"use at least {squeeze_factor} channels")
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel-attention block: conv3x3 C -> C/r, GELU, conv3x3 back, channel attention (squeeze 30)."""

    def __init__(self, num_feat: int, is_light_sr: bool = False, compress_ratio: int = 3, squeeze_factor: int = 30):
        super().__init__()
        if is_light_sr:  # the lightweight-SR model compresses harder to save parameters
            compress_ratio = 6
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class VSSBlock(nn.Module):
    """Residual state-space block on channels-last maps (B, H, W, C):

    x = s1 ⊙ x + SS2D(LN(x));  x = s2 ⊙ x + CAB(LN(x)), with learnt per-channel skip scales.
    """

    def __init__(self, hidden_dim: int, d_state: int = 16, expand: float = 2.0, is_light_sr: bool = False,
                 scan_backend: str = "auto"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = SS2D(hidden_dim, d_state=d_state, expand=expand, scan_backend=scan_backend)
        self.skip_scale = nn.Parameter(torch.ones(hidden_dim))
        self.conv_blk = CAB(hidden_dim, is_light_sr)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.skip_scale2 = nn.Parameter(torch.ones(hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.skip_scale + self.self_attention(self.ln_1(x))
        conv = self.conv_blk(self.ln_2(x).permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return x * self.skip_scale2 + conv.permute(0, 2, 3, 1)


class VSSBlock2d(VSSBlock):
    """The same block on channels-first maps (B, C, H, W), for the U-Net skeleton."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class BasicLayer(nn.Module):
    """A sequence of VSS blocks (key prefix ``residual_group.blocks.j``)."""

    def __init__(self, dim: int, depth: int, **block_options):
        super().__init__()
        self.blocks = nn.ModuleList([VSSBlock(dim, **block_options) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ResidualGroup(nn.Module):
    """Residual State-Space Group: VSS blocks, a 3x3 conv, and a residual around both."""

    def __init__(self, dim: int, depth: int, **block_options):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, **block_options)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.residual_group(x).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        return self.conv(y).permute(0, 2, 3, 1) + x


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H, W, C), then LayerNorm (key ``patch_embed.norm``)."""

    def __init__(self, embed_dim: int, patch_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


def make_upsampler(upsampler: str, upscale: int, embed_dim: int, num_feat: int, num_out_ch: int) -> dict:
    """The reconstruction tail's modules by their release names (SwinIR/MambaIR share it)."""
    if upsampler == "pixelshuffle":  # classic SR: conv, LeakyReLU, (conv + shuffle) stages, conv
        stages: list[nn.Module] = []
        if upscale & (upscale - 1) == 0:
            for _ in range(int(math.log2(upscale))):
                stages += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif upscale == 3:
            stages += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"pixelshuffle supports upscale 2^n or 3, got {upscale}")
        return {
            "conv_before_upsample": nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)),
            "upsample": nn.Sequential(*stages),
            "conv_last": nn.Conv2d(num_feat, num_out_ch, 3, 1, 1),
        }
    if upsampler == "pixelshuffledirect":  # lightweight SR: one conv to scale² · out channels
        return {"upsample": nn.Sequential(nn.Conv2d(embed_dim, upscale ** 2 * num_out_ch, 3, 1, 1),
                                          nn.PixelShuffle(upscale))}
    if upsampler == "":
        if upscale != 1:
            raise ValueError(f"upsampler '' (denoising / JPEG) needs upscale 1, got {upscale}")
        return {"conv_last": nn.Conv2d(embed_dim, num_out_ch, 3, 1, 1)}
    raise ValueError(f"unknown upsampler {upsampler!r}; valid: {list(UPSAMPLERS)}")


def check_body(depths: Sequence[int], resi_connection: str) -> None:
    """The released MambaIR-family bodies: positive block counts, one conv after each group."""
    if resi_connection != "1conv":
        raise ValueError(f"only resi_connection='1conv' is implemented (the released configs), got "
                         f"{resi_connection!r}")
    if not depths or any(int(n) < 1 for n in depths):
        raise ValueError(f"depths must be positive block counts, got {list(depths)}")


def reconstruct_image(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The SwinIR family's image path (SwinIR, MambaIR, MambaIRv2): normalise, shallow convolution,
    deep features, then the upsampler or (denoising / JPEG) a global residual, de-normalise.

    ``net`` has ``mean``, ``img_range``, ``upsampler``, ``conv_first``, ``forward_features``,
    ``conv_after_body`` and the upsampler's or the residual's convolutions. (B, C, H, W) -> (B, C, sH, sW).
    """
    mean = net.mean.to(x)
    x = (x - mean) * net.img_range
    if net.upsampler == "pixelshuffle":
        x = net.conv_first(x)
        x = net.conv_after_body(net.forward_features(x)) + x
        x = net.conv_last(net.upsample(net.conv_before_upsample(x)))
    elif net.upsampler == "pixelshuffledirect":
        x = net.conv_first(x)
        x = net.upsample(net.conv_after_body(net.forward_features(x)) + x)
    else:  # denoising / JPEG: global residual on the image
        first = net.conv_first(x)
        x = x + net.conv_last(net.conv_after_body(net.forward_features(first)) + first)
    return x / net.img_range + mean


class MambaIR(nn.Module):
    """SwinIR-style MambaIR: shallow conv, residual state-space groups, reconstruction.

    Input (B, in_chans, h, w) in [0, 1], any size; output (B, in_chans, upscale·h, upscale·w).
    ``img_size`` only records the training patch (it shapes no parameter here).
    """

    pad_multiple = 1

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        d_state: int = 16,
        mlp_ratio: float = 2.0,
        patch_norm: bool = True,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
        scan_backend: str = "auto",
    ):
        super().__init__()
        check_body(depths, resi_connection)
        num_feat = 64
        self.img_size, self.img_range, self.upscale, self.upsampler = img_size, img_range, upscale, upsampler
        # A plain attribute, not a buffer: the release keeps it out of the state dict.
        self.mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        is_light_sr = upsampler == "pixelshuffledirect"

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        self.layers = nn.ModuleList([
            ResidualGroup(embed_dim, int(n), d_state=d_state, expand=mlp_ratio, is_light_sr=is_light_sr,
                          scan_backend=scan_backend)
            for n in depths
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        for name, module in make_upsampler(upsampler, upscale, embed_dim, num_feat, in_chans).items():
            self.add_module(name, module)
        self.apply(init_transformer_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> deep features (B, C, H, W)."""
        x = self.patch_embed(x)  # (B, H, W, C)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reconstruct_image(self, x)


class MambaIRUNet(RestormerUNet):
    """Restormer's U-Net (same module names) with VSS blocks; (B, C, H, W), H and W multiples of 8.

    ``d_state`` is one value or four per-level values (decoder level 1 and the refinement use
    level 0's, as all blocks at 2·dim do in the skeleton); the real-denoising release uses 16
    everywhere.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        mlp_ratio: float = 1.5,
        d_state: int | Sequence[int] = 16,
        bias: bool = False,
        dual_pixel_task: bool = False,
        scan_backend: str = "auto",
    ):
        states = [int(d_state)] * 4 if isinstance(d_state, (int, float)) else [int(n) for n in d_state]
        if len(states) != 4:
            raise ValueError(f"d_state must be one value or 4 per-level values, got {d_state}")
        super().__init__(
            lambda channels, level: VSSBlock2d(channels, d_state=states[level], expand=mlp_ratio,
                                               scan_backend=scan_backend),
            in_channels, out_channels, dim, num_blocks, num_refinement_blocks, bias, dual_pixel_task,
        )
