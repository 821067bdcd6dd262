"""EAMamba (Lin et al., ICCV 2025) and its ablation family, weight-compatible with the release.

Read top to bottom: the MHSSM token mixer (its scan is ``harness.ops.route_scan.multi_route_scan``,
shared with MambaIR's SS2D), the MambaFormer block, the restoration U-Net and the lightweight SR
network.

MHSSM generalises the paper's module along the axes its ablations vary:
- ``directions``: any list of scan routes or a named set (``harness/ops/routes.py``);
- ``heads``: channel groups; head i reads route i mod k, so heads must be a multiple of the
  number of routes k and divide d_inner (the release: heads = k = 8);
- ``merge``: ``concat`` (multi-head: each route scans its own channel group, results are
  concatenated) or ``add`` (2D-SS of VMamba/MambaIR: every route scans all channels with its
  own projections and the k results are summed);
- ``d_state``, ``d_conv``, ``expand``, ``conv_2d``, ``use_z`` (gate branch on/off).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.models.layers import ChannelLayerNorm, batched_mm, make_mixer, resolve_fast_path
from harness.models.unet import RestormerUNet
from harness.ops import norm_triton
from harness.ops.route_scan import MERGES, multi_route_scan, uses_fused_path
from harness.ops.routes import resolve_directions


def init_ssm_parameters(
    heads: int, d: int, dt_rank: int, d_state: int, dt_min: float = 1e-3, dt_max: float = 0.1,
    dt_init_floor: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """Mamba/VMamba initialisation of one multi-route scan's parameters (random, but standard)."""
    x_proj = torch.empty(heads, dt_rank + 2 * d_state, d)
    nn.init.uniform_(x_proj, -d ** -0.5, d ** -0.5)  # nn.Linear's default range, as released
    dt_w = torch.empty(heads, d, dt_rank)
    nn.init.uniform_(dt_w, -dt_rank ** -0.5, dt_rank ** -0.5)
    # Bias = softplus⁻¹(dt) with dt log-uniform in [dt_min, dt_max]: steps start at sane scales.
    dt = torch.exp(torch.rand(heads, d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    # A = -(1..N) per channel (S4D-real): a spread of decay rates from the start.
    A_logs = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(heads * d, 1)
    return {
        "x_proj_weight": x_proj,
        "dt_projs_weight": dt_w,
        "dt_projs_bias": dt_bias,
        "A_logs": A_logs,
        "Ds": torch.ones(heads * d),
    }


class MHSSM(nn.Module):
    """Multi-head selective scan module (the block's token mixer, keys ``mamba.*``)."""

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 1,
        dt_rank: int | str = "auto",
        directions: str | Sequence[str] = "all_around",
        heads: int | None = None,
        merge: str = "concat",
        conv_2d: bool = True,
        use_z: bool = True,
        scan_backend: str = "auto",
        fast_path: bool | None = None,
    ):
        super().__init__()
        routes = resolve_directions(directions)
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; valid merges: {list(MERGES)}")
        if int(d_state) < 1:
            raise ValueError(f"d_state must be >= 1, got {d_state}")
        if int(d_conv) < 1 or (conv_2d and int(d_conv) % 2 == 0):
            raise ValueError(f"d_conv must be >= 1 (odd for conv_2d), got {d_conv}")
        d_inner = int(expand * dim)
        if d_inner < 1:
            raise ValueError(f"expand * dim must be >= 1, got expand={expand}, dim={dim}")
        k = len(routes)
        heads = k if heads is None else int(heads)
        if merge == "add":
            if heads != k:
                raise ValueError(f"merge='add' scans every route over all channels: heads must equal the "
                                 f"number of routes ({k}), got {heads}")
            d = d_inner
        else:
            if heads < 1 or heads % k:
                raise ValueError(f"heads ({heads}) must be a positive multiple of the number of routes ({k})")
            if d_inner % heads:
                raise ValueError(f"heads ({heads}) must divide the inner channels d_inner={d_inner} "
                                 f"(dim {dim} x expand {expand})")
            d = d_inner // heads
        self.d_inner, self.d_state, self.merge = d_inner, int(d_state), merge
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.routes = routes
        self.head_routes = tuple(routes[i % k] for i in range(heads))
        self.conv_2d, self.use_z, self.scan_backend = conv_2d, use_z, scan_backend
        self.fast_path = resolve_fast_path(fast_path)  # see harness.models.layers

        # Direct parameters first: their order is the release's state-dict order.
        for name, value in init_ssm_parameters(heads, d, self.dt_rank, self.d_state).items():
            self.register_parameter(name, nn.Parameter(value))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.in_proj = nn.Linear(dim, d_inner * (2 if use_z else 1), bias=False)
        if conv_2d:
            self.conv = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        else:
            self.conv = nn.Conv1d(d_inner, d_inner, d_conv, padding=d_conv - 1, groups=d_inner, bias=True)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path and self.conv_2d and uses_fused_path(x, self.scan_backend):
            return self.forward_fast(x)
        b, c, h, w = x.shape
        L = h * w
        xz = self.in_proj(x.permute(0, 2, 3, 1))  # (B, H, W, C) -> (B, H, W, (2)·d_inner)
        xin, z = xz.chunk(2, dim=-1) if self.use_z else (xz, None)
        xin = xin.permute(0, 3, 1, 2).contiguous()  # (B, d_inner, H, W)
        if self.conv_2d:
            xin = F.silu(self.conv(xin))
        else:  # causal depthwise conv along the raster sequence
            xin = F.silu(self.conv(xin.flatten(2))[..., :L]).view(b, self.d_inner, h, w)
        y = multi_route_scan(
            xin, self.head_routes, self.merge, self.x_proj_weight, self.dt_projs_weight,
            self.dt_projs_bias, self.A_logs, self.Ds, self.scan_backend,
        )  # (B, d_inner, L)
        y = self.out_norm(y.transpose(1, 2))  # (B, L, d_inner)
        if z is not None:
            y = y * F.silu(z.reshape(b, L, self.d_inner))
        return self.out_proj(y).transpose(1, 2).reshape(b, c, h, w)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` laid out for the fused route scan (``harness/ops/route_scan_fused.py``):
        the maps stay channels-last from the input projection to the output, so the scan reads
        and writes them without copies. Without gradients the projections are ``mm``/``bmm`` on
        transposed operands (no copies either); with gradients they stay ``F.linear``, whose
        backward is the faster one. The output norm and the gate are one Triton kernel."""
        b, c, h, w = x.shape
        L = h * w
        project = batched_mm if not torch.is_grad_enabled() else None
        if self.use_z:
            # two products instead of one and a chunk: xin and z come out contiguous, so xin is a
            # channels_last map without a copy and the gate reads z densely
            w_in = self.in_proj.weight
            if project is not None:
                x_rows = x.reshape(b, c, L).transpose(1, 2)  # (B, L, C) view
                xin = project(x_rows, w_in[:self.d_inner].t()).view(b, h, w, self.d_inner)
                z = project(x_rows, w_in[self.d_inner:].t())  # (B, L, d_inner)
            else:
                x_hwc = x.permute(0, 2, 3, 1).contiguous()  # one copy (F.linear would copy it for each)
                xin, z = F.linear(x_hwc, w_in[:self.d_inner]), F.linear(x_hwc, w_in[self.d_inner:])
        else:
            xin, z = self.in_proj(x.permute(0, 2, 3, 1)), None  # (B, H, W, d_inner)
        del x  # the block's normalised input: free before the scan's buffers are allocated
        xin = xin.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (B, d_inner, H, W)
        xin = F.silu(self.conv(xin))
        y = multi_route_scan(
            xin, self.head_routes, self.merge, self.x_proj_weight, self.dt_projs_weight,
            self.dt_projs_bias, self.A_logs, self.Ds, self.scan_backend,
        )  # (B, d_inner, L), a view of (B, L, d_inner) memory
        del xin
        y = y.transpose(1, 2)  # (B, L, d_inner)
        z = None if z is None else z.reshape(b, L, self.d_inner)
        if norm_triton.can_use(y) and y.stride(2) == 1:  # norm and gate in one kernel
            y = norm_triton.layer_norm_last_dim(y, self.out_norm.weight, self.out_norm.bias, self.out_norm.eps, z)
        else:
            y = self.out_norm(y)
            if z is not None:
                y = y * F.silu(z)
        if project is not None:  # out^T = W y^T straight into (B, C, H·W) memory
            return project(self.out_proj.weight, y.transpose(1, 2)).view(b, c, h, w)
        # a (B, C, H, W) view of channels-last memory: the residual add reads it as it is
        return self.out_proj(y).view(b, h, w, c).permute(0, 3, 1, 2)


class MambaFormerBlock(nn.Module):
    """x + MHSSM(norm1(x)), then x + mixer(norm2(x)), on (B, C, H, W) maps."""

    def __init__(self, dim: int, mixer: str = "simple", ffn_expansion_factor: float = 2.0, bias: bool = False,
                 norm_type: str = "WithBias", **ssm_options):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, norm_type)
        self.mamba = MHSSM(dim, **ssm_options)
        self.norm2 = ChannelLayerNorm(dim, norm_type)
        self.ffn = make_mixer(mixer, dim, ffn_expansion_factor, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mamba(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class EAMamba(RestormerUNet):
    """The released restoration network: Restormer's U-Net with MambaFormer blocks."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        dim: int = 64,
        num_blocks: Sequence[int] = (4, 6, 6, 7),
        num_refinement_blocks: int = 2,
        mixer: str = "simple",
        ffn_expansion_factor: float = 2.0,
        bias: bool = False,
        norm_type: str = "WithBias",
        dual_pixel_task: bool = False,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 1,
        directions: str | Sequence[str] = "all_around",
        heads: int | None = None,
        merge: str = "concat",
        conv_2d: bool = True,
        use_z: bool = True,
        scan_backend: str = "auto",
    ):
        ssm = dict(d_state=d_state, d_conv=d_conv, expand=expand, directions=directions, heads=heads,
                   merge=merge, conv_2d=conv_2d, use_z=use_z, scan_backend=scan_backend)
        super().__init__(
            lambda channels, level: MambaFormerBlock(channels, mixer, ffn_expansion_factor, bias, norm_type, **ssm),
            in_channels, out_channels, dim, num_blocks, num_refinement_blocks, bias, dual_pixel_task,
        )


class ResidualGroup(nn.Module):
    """MambaFormer blocks followed by a 3×3 conv, with a residual around the group."""

    def __init__(self, dim: int, depth: int, **block_options):
        super().__init__()
        self.blocks = nn.Sequential(*[MambaFormerBlock(dim, **block_options) for _ in range(depth)])
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.blocks(x))


class EAMambaSR(nn.Module):
    """Lightweight super-resolution network (released ``eamambasr``): LR (B,3,h,w) -> (B,3,s·h,s·w)."""

    pad_multiple = 1

    def __init__(
        self,
        upscale: int = 4,
        in_channels: int = 3,
        out_channels: int = 3,
        dim: int = 64,
        depths: Sequence[int] = (4, 4, 4, 4),
        mixer: str = "simple",
        ffn_expansion_factor: float = 1.0,
        bias: bool = False,
        norm_type: str = "WithBias",
        d_state: int = 10,
        d_conv: int = 3,
        expand: float = 1,
        directions: str | Sequence[str] = "all_around",
        heads: int | None = None,
        merge: str = "concat",
        conv_2d: bool = True,
        use_z: bool = True,
        scan_backend: str = "auto",
    ):
        super().__init__()
        if upscale not in (2, 3, 4):
            raise ValueError(f"EAMambaSR supports upscale 2, 3 or 4, got {upscale}")
        if not depths or any(int(n) < 1 for n in depths):
            raise ValueError(f"depths must be positive block counts, got {list(depths)}")
        self.upscale = upscale
        block = dict(mixer=mixer, ffn_expansion_factor=ffn_expansion_factor, bias=bias, norm_type=norm_type,
                     d_state=d_state, d_conv=d_conv, expand=expand, directions=directions, heads=heads,
                     merge=merge, conv_2d=conv_2d, use_z=use_z, scan_backend=scan_backend)
        self.conv_first = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)
        self.layers = nn.ModuleList([ResidualGroup(dim, int(n), **block) for n in depths])
        self.norm = ChannelLayerNorm(dim, norm_type)
        self.conv_after_body = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=True), nn.LeakyReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        for factor in ((2, 2) if upscale == 4 else (upscale,)):
            stages += [nn.Conv2d(dim, dim * factor * factor, kernel_size=3, padding=1, bias=True),
                       nn.PixelShuffle(factor)]
        self.upsample = nn.Sequential(*stages)
        self.conv_last = nn.Conv2d(dim, out_channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)  # (B, C, h, w)
        body = feat
        for layer in self.layers:
            body = layer(body)
        feat = self.conv_after_body(self.norm(body)) + feat  # long residual
        return self.conv_last(self.upsample(self.conv_before_upsample(feat)))  # (B, 3, s·h, s·w)
