"""SwinIR (Liang et al., ICCVW 2021): residual Swin-Transformer groups for image restoration.

Names follow the release (``models/network_swinir.py``): ``conv_first``, ``patch_embed.norm``,
``layers.i.residual_group.blocks.j.{norm1, attn, norm2, mlp}``, ``layers.i.conv``, ``norm``,
``conv_after_body``, ``conv_last``. Like the release, every block registers
``attn.relative_position_index`` and every shifted block ``attn_mask`` (for an
``img_size`` x ``img_size`` input) as persistent buffers, so checkpoints load strictly.

Window attention is written as explicit matmuls (no ``scaled_dot_product_attention``) so that
FLOP counters see it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.mambair import RGB_MEAN, UPSAMPLERS, make_upsampler, reconstruct_image
from harness.models.layers import init_transformer_weights, trunc_normal_


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, ws, ws, C), windows in raster order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B·nW, ws, ws, C) -> (B, H, W, C), the inverse of ``window_partition``."""
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws², ws²) index into the (2ws-1)² bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, ws²)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (ws², ws², 2), >= 0
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws², ws²) additive mask: -100 between positions that came from different regions
    of the cyclically shifted map (they are not neighbours in the image), 0 otherwise."""
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).view(-1, ws * ws)  # (nW, ws²) region labels
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def window_attention(attn: nn.Module, qkv: torch.Tensor, rpi: torch.Tensor, mask: torch.Tensor | None
                     ) -> torch.Tensor:
    """Multi-head attention inside windows with a learnt relative-position bias (SwinIR, MambaIRv2).

    ``attn`` holds ``num_heads``, ``scale``, ``relative_position_bias_table`` and ``proj``; ``qkv`` is
    (B·nW, ws², 3C), ``rpi`` the (ws², ws²) relative-position index, ``mask`` the shifted windows'
    (nW, ws², ws²) or None. Explicit matmuls (no ``scaled_dot_product_attention``), so FLOP
    counters see them. Returns (B·nW, ws², C).
    """
    bw, n, c3 = qkv.shape
    c = c3 // 3
    qkv = qkv.reshape(bw, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]  # (B·nW, heads, ws², C/heads)
    scores = q @ k.transpose(-2, -1)  # (B·nW, heads, ws², ws²)
    bias = attn.relative_position_bias_table[rpi.view(-1)].view(n, n, -1)
    scores = scores + bias.permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        scores = scores.view(bw // nw, nw, attn.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, attn.num_heads, n, n)
    x = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
    return attn.proj(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows, with a learnt relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the embedding width ({dim})")
        self.window_size, self.num_heads = window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return window_attention(self, self.qkv(x), self.relative_position_index, mask)  # (B·nW, ws², C)


class Mlp(nn.Module):
    """fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and an MLP, pre-norm residuals, on tokens (B, H·W, C)."""

    def __init__(self, dim: int, input_resolution: int, num_heads: int, window_size: int = 8, shift_size: int = 0,
                 mlp_ratio: float = 2.0):
        super().__init__()
        if input_resolution <= window_size:
            # One window covers the image: no shift, window = image (as released).
            shift_size, window_size = 0, input_resolution
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size}")
        self.input_resolution, self.window_size, self.shift_size = input_resolution, window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(input_resolution, input_resolution, window_size, shift_size) if shift_size else None
        self.register_buffer("attn_mask", mask)  # None (unregistered) for unshifted blocks

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, c)  # (B·nW, ws², C)
        if not shift:
            mask = None
        elif (h, w) == (self.input_resolution, self.input_resolution):
            mask = self.attn_mask
        else:  # another test size: the mask depends on the map size
            mask = shifted_window_mask(h, w, ws, shift).to(x.device)
        x = window_reverse(self.attn(windows, mask).view(-1, ws, ws, c), ws, h, w)  # (B, H, W, C)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + x.view(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks alternating unshifted and half-window-shifted windows."""

    def __init__(self, dim: int, input_resolution: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, x_size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a 3x3 conv, a residual around both."""

    def __init__(self, dim: int, input_resolution: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float):
        super().__init__()
        self.residual_group = BasicLayer(dim, input_resolution, depth, num_heads, window_size, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, x_size).transpose(1, 2).view(b, c, *x_size)  # (B, L, C) -> (B, C, H, W)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> tokens (B, H·W, C), then LayerNorm (key ``patch_embed.norm``)."""

    def __init__(self, embed_dim: int, patch_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class SwinIR(nn.Module):
    """(B, in_chans, h, w) in [0, 1] -> (B, in_chans, upscale·h, upscale·w).

    Inputs are reflect-padded internally to a multiple of ``window_size`` and the output is
    cropped back, as in the release; ``pad_multiple`` tells the harness to pad beforehand.
    """

    pad_multiple = 8

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_norm: bool = True,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
    ):
        super().__init__()
        if resi_connection != "1conv":
            raise ValueError(f"only resi_connection='1conv' is implemented, got {resi_connection!r}")
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths and num_heads need the same non-zero length, got {list(depths)} "
                             f"and {list(num_heads)}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"unknown upsampler {upsampler!r}; valid: {list(UPSAMPLERS)}")
        self.img_range, self.upscale, self.upsampler = img_range, upscale, upsampler
        self.window_size = self.pad_multiple = window_size
        # A plain attribute, not a buffer: the release keeps it out of the state dict.
        self.mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        self.layers = nn.ModuleList([
            RSTB(embed_dim, img_size, int(d), int(h), window_size, mlp_ratio) for d, h in zip(depths, num_heads)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        for name, module in make_upsampler(upsampler, upscale, embed_dim, 64, in_chans).items():
            self.add_module(name, module)
        self.apply(init_transformer_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> deep features (B, C, H, W)."""
        b, c, h, w = x.shape
        x = self.patch_embed(x)  # (B, H·W, C)
        for layer in self.layers:
            x = layer(x, (h, w))
        return self.norm(x).transpose(1, 2).view(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.window_size, (-w) % self.window_size
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        x = reconstruct_image(self, x)
        return x[:, :, : h * self.upscale, : w * self.upscale]


