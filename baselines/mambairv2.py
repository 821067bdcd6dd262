"""MambaIRv2 (Guo et al., CVPR 2025): attentive state-space restoration.

Read top to bottom: the feed-forward parts (``ConvFFN`` for the base models, ``GatedMLP`` for
the light SR model), window attention on precomputed q/k/v, the single-route selective scan
with its prompt (``SelectiveScan``), the attentive state-space module (``ASSM``: token routing,
semantic sort, scan, unsort), the block pairing both (``AttentiveLayer``), the residual group
(``ASSB``) and the SwinIR-style network (``MambaIRv2`` / ``MambaIRv2Light``). Parameter names,
order and the ``relative_position_index_SA`` buffer are the release's
(``basicsr/archs/mambairv2_arch.py``, ``mambairv2light_arch.py``), so its checkpoints load
strictly. Tokens travel as sequences (B, H·W, C) in raster order, as released.

Token routing (what the released forward does, and what this module reproduces):

- A per-token router (``route``: Linear, GELU, Linear, LogSoftmax) scores ``num_tokens``
  semantic classes. ``F.gumbel_softmax(hard=True)`` picks one class per token; it samples
  Gumbel noise whatever the module's mode, so the release's *eval* forward is random too.
- The picked class selects a prompt (``embeddingB @ embeddingA``, (num_tokens, d_state)) that
  is added to the scan's C. The tokens are sorted by class (``torch.sort(stable=False)``),
  scanned in that order, and put back. As released, the prompt is added in raster order while
  the scan runs in sorted order (position t of the scan gets the prompt of raster token t).
- Ties inside a class are ordered by ``torch.sort``'s unstable algorithm: on the CPU a fixed
  function of its input (for one PyTorch build), not raster order, and not necessarily the order
  a GPU sort gives.

Determinism: with the defaults (``routing_noise=True, stable_sort=False``) outputs equal the
release's, draw for draw: this module consumes the RNG exactly as the release does (one
exponential draw of shape (B, H·W, num_tokens) per layer, in layer order), so
``torch.manual_seed(s)`` before a forward gives the release's output under the same seed.
Without a seed, two eval forwards of the same input differ. For a deterministic model set ``routing_noise=False``: in eval, each token takes the argmax of its
route logits (training still samples). ``stable_sort=True`` also orders tokens of one class by
raster position, which makes the token order the same on every device. The release's test
code (``MambaIRv2Model.test``) feeds an image in tiles of at most 200 px a side plus a 10 %
overlap; that is an evaluation protocol, not part of this network.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.mambair import RGB_MEAN, UPSAMPLERS, check_body, make_upsampler, reconstruct_image
from baselines.swinir import (
    relative_position_index,
    shifted_window_mask,
    window_attention,
    window_partition,
    window_reverse,
)
from harness.models.eamamba import init_ssm_parameters
from harness.models.layers import init_transformer_weights, trunc_normal_
from harness.ops import selective_scan

FFNS = ("conv", "gated")


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H·W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C)."""
    return x.flatten(2).transpose(1, 2)


# --- feed-forward parts ----------------------------------------------------------------------

class DepthwiseConvGELU(nn.Module):
    """Depthwise k×k conv + GELU on tokens (key ``depthwise_conv.0``): (B, L, C) -> (B, L, C)."""

    def __init__(self, channels: int, kernel_size: int = 5):
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, 1, (kernel_size - 1) // 2, groups=channels), nn.GELU())

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return map_to_tokens(self.depthwise_conv(tokens_to_map(x, *size)))


class ConvFFN(nn.Module):
    """fc1, GELU, plus a depthwise-conv branch (x + dwconv(x)), fc2 — the base models' FFN."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConvGELU(hidden, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.gelu(self.fc1(x))  # (B, L, hidden)
        return self.fc2(x + self.dwconv(x, size))


class Gate(nn.Module):
    """Spatial gate: x1 · dwconv5x5(LN(x2)) over the two channel halves: (B, L, 2c) -> (B, L, c)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.conv = nn.Conv2d(channels, channels, 5, 1, 2, groups=channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * map_to_tokens(self.conv(tokens_to_map(self.norm(x2), *size)))


class GatedMLP(nn.Module):
    """fc1, GELU, spatial gate (halves the width), fc2 — the light SR model's FFN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = Gate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.sg(F.gelu(self.fc1(x)), size))


# --- window attention ------------------------------------------------------------------------

class WindowAttention(nn.Module):
    """Multi-head attention in ws×ws windows on precomputed q/k/v (the block owns ``wqkv``)."""

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the embedding width ({dim})")
        self.window_size, self.num_heads = window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, qkv: torch.Tensor, rpi: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return window_attention(self, qkv, rpi, mask)  # (B·nW, ws², 3C) -> (B·nW, ws², C)


# --- attentive state space -------------------------------------------------------------------

class SelectiveScan(nn.Module):
    """One-route selective scan whose C carries a per-token prompt: (B, L, D), (B, L, N) -> (B, L, D).

    Parameters keep the release's stacked layout with one route (``x_proj_weight`` (1, R+2N, D),
    ``dt_projs_*`` (1, ...)); dt_rank = ceil(D / 16). The scan runs in fp32, as released.
    """

    def __init__(self, d_inner: int, d_state: int, scan_backend: str = "auto"):
        super().__init__()
        self.d_inner, self.d_state = d_inner, d_state
        self.dt_rank = -(-d_inner // 16)
        self.scan_backend = scan_backend
        for name, value in init_ssm_parameters(1, d_inner, self.dt_rank, d_state).items():
            self.register_parameter(name, nn.Parameter(value))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        b, L, d = x.shape
        xs = x.transpose(1, 2).reshape(b, 1, d, L)  # (B, 1, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, 1, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, 1, D, L)
        Cs = Cs.float() + prompt.transpose(1, 2).reshape(b, 1, self.d_state, L)  # the prompt enters C
        y = selective_scan(
            xs.float().reshape(b, d, L), dts.float().reshape(b, d, L), -torch.exp(self.A_logs.float()),
            Bs.float(), Cs, self.Ds.float(), delta_bias=self.dt_projs_bias.float().view(-1),
            delta_softplus=True, backend=self.scan_backend,
        )  # (B, D, L)
        return y.transpose(1, 2)


def route_policy(logits: torch.Tensor, sample: bool) -> torch.Tensor:
    """One-hot class per token (forward) with softmax gradients (straight-through).

    ``sample``: Gumbel-softmax as released (random); otherwise the argmax of the logits.
    """
    if sample:
        return F.gumbel_softmax(logits, hard=True, dim=-1)
    soft = logits.softmax(dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class ASSM(nn.Module):
    """Attentive state-space module: route tokens to classes, scan them grouped by class.

    (B, L, C) -> (B, L, C); hidden = int(mlp_ratio·C) channels inside.
    """

    def __init__(self, dim: int, d_state: int, num_tokens: int = 64, inner_rank: int = 128,
                 mlp_ratio: float = 2.0, routing_noise: bool = True, stable_sort: bool = False,
                 scan_backend: str = "auto"):
        super().__init__()
        if dim // 3 < 1:
            raise ValueError(f"the router's hidden width is dim // 3; dim {dim} is too small (use >= 3)")
        self.d_state, self.num_tokens = d_state, num_tokens
        self.routing_noise, self.stable_sort = routing_noise, stable_sort
        hidden = int(dim * mlp_ratio)
        self.selectiveScan = SelectiveScan(hidden, d_state, scan_backend)
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, dim)
        self.in_proj = nn.Sequential(nn.Conv2d(dim, hidden, 1))
        self.CPE = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden))  # conv position gate
        self.embeddingB = nn.Embedding(num_tokens, inner_rank)
        nn.init.uniform_(self.embeddingB.weight, -1 / num_tokens, 1 / num_tokens)
        self.route = nn.Sequential(nn.Linear(dim, dim // 3), nn.GELU(), nn.Linear(dim // 3, num_tokens),
                                   nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, size: tuple[int, int], embedding_a: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        prompts = self.embeddingB.weight @ embedding_a  # (T, rank) @ (rank, N) -> (T, N)
        policy = route_policy(self.route(x), self.training or self.routing_noise)  # (B, L, T) one-hot
        prompt = torch.matmul(policy, prompts).view(b, n, self.d_state)  # (B, L, N), raster order
        cls = policy.detach().argmax(dim=-1)  # (B, L)
        order = torch.sort(cls, dim=-1, stable=self.stable_sort).indices  # (B, L): sorted -> raster
        positions = torch.arange(n, device=x.device).expand(b, n)
        inverse = torch.empty_like(order).scatter_(-1, order, positions)  # raster -> sorted

        x = self.in_proj(tokens_to_map(x, *size))  # (B, hidden, H, W)
        x = map_to_tokens(x * torch.sigmoid(self.CPE(x)))  # (B, L, hidden)
        hidden = x.shape[-1]
        x = torch.gather(x, 1, order.unsqueeze(-1).expand(b, n, hidden))  # grouped by class
        y = self.out_proj(self.out_norm(self.selectiveScan(x, prompt)))  # (B, L, C), sorted order
        return torch.gather(y, 1, inverse.unsqueeze(-1).expand(b, n, c))  # back to raster order


class AttentiveLayer(nn.Module):
    """(Shifted-)window attention + FFN, then ASSM + FFN, each pair with a learnt skip scale.

    Tokens (B, H·W, C); H and W multiples of the window (the network pads).
    """

    def __init__(self, dim: int, d_state: int, num_heads: int, window_size: int, shift_size: int,
                 inner_rank: int, num_tokens: int, convffn_kernel_size: int, mlp_ratio: float,
                 ffn: str = "conv", qkv_bias: bool = True, routing_noise: bool = True, stable_sort: bool = False,
                 scan_backend: str = "auto"):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))
        # Skip scales start at 1e-4 (as released): each pair's shortcut begins almost closed.
        self.scale1 = nn.Parameter(1e-4 * torch.ones(dim))
        self.scale2 = nn.Parameter(1e-4 * torch.ones(dim))
        self.wqkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.win_mhsa = WindowAttention(dim, window_size, num_heads)
        self.assm = ASSM(dim, d_state, num_tokens, inner_rank, mlp_ratio, routing_noise, stable_sort, scan_backend)
        hidden = int(dim * mlp_ratio)
        if ffn == "conv":
            self.convffn1 = ConvFFN(dim, hidden, convffn_kernel_size)
            self.convffn2 = ConvFFN(dim, hidden, convffn_kernel_size)
        elif ffn == "gated":  # the release keeps the key names convffn1/2 for the gated MLPs
            self.convffn1, self.convffn2 = GatedMLP(dim, hidden), GatedMLP(dim, hidden)
        else:
            raise ValueError(f"unknown ffn {ffn!r}; valid: {list(FFNS)}")
        self.embeddingA = nn.Embedding(inner_rank, d_state)
        nn.init.uniform_(self.embeddingA.weight, -1 / inner_rank, 1 / inner_rank)

    def forward(self, x: torch.Tensor, size: tuple[int, int], rpi: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:
        h, w = size
        b, n, c = x.shape
        ws, shift = self.window_size, self.shift_size
        # Window attention (cyclic shift on odd layers).
        shortcut = x
        qkv = self.wqkv(self.norm1(x)).reshape(b, h, w, 3 * c)
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(qkv, ws).view(-1, ws * ws, 3 * c)  # (B·nW, ws², 3C)
        attn = self.win_mhsa(windows, rpi, attn_mask if shift else None).view(-1, ws, ws, c)
        attn = window_reverse(attn, ws, h, w)  # (B, H, W, C)
        if shift:
            attn = torch.roll(attn, shifts=(shift, shift), dims=(1, 2))
        x_win = attn.reshape(b, n, c) + shortcut
        x_win = self.convffn1(self.norm2(x_win), size) + x_win
        x = shortcut * self.scale1 + x_win
        # Attentive state space.
        shortcut = x
        x_aca = self.assm(self.norm3(x), size, self.embeddingA.weight) + x
        x = x_aca + self.convffn2(self.norm4(x_aca), size)
        return shortcut * self.scale2 + x


class BasicBlock(nn.Module):
    """``depth`` attentive layers, unshifted and shifted by half a window alternately."""

    def __init__(self, depth: int, window_size: int, **layer_options):
        super().__init__()
        self.layers = nn.ModuleList([
            AttentiveLayer(window_size=window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                           **layer_options)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, size, rpi, attn_mask) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, size, rpi, attn_mask)
        return x


class ASSB(nn.Module):
    """Attentive state-space group: attentive layers, a 3x3 conv, a residual around both."""

    def __init__(self, dim: int, depth: int, **layer_options):
        super().__init__()
        self.residual_group = BasicBlock(depth, dim=dim, **layer_options)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, size, rpi, attn_mask) -> torch.Tensor:
        y = tokens_to_map(self.residual_group(x, size, rpi, attn_mask), *size)  # (B, C, H, W)
        return map_to_tokens(self.conv(y)) + x


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> tokens (B, H·W, C), then LayerNorm (key ``patch_embed.norm``)."""

    def __init__(self, embed_dim: int, patch_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = map_to_tokens(x)
        return self.norm(x) if self.norm is not None else x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Mirror-pad (B, C, H, W) at the bottom/right to multiples of ``multiple`` (edge repeated, as released)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph > h or pw > w:
        raise ValueError(f"input {h}x{w} is smaller than the padding it needs to reach a multiple of the "
                         f"window ({multiple}); use at least {multiple // 2 + 1} pixels per side")
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, :h + ph, :]
    return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, :w + pw]


class MambaIRv2(nn.Module):
    """SwinIR-style MambaIRv2: shallow conv, attentive state-space groups, reconstruction.

    Input (B, in_chans, h, w) in [0, 1], any size (mirror-padded to the window, cropped back);
    output (B, in_chans, upscale·h, upscale·w). ``img_size`` only records the training patch.
    ``ffn``: "conv" (ConvFFN, MambaIRv2) or "gated" (GatedMLP, MambaIRv2Light).
    ``routing_noise`` / ``stable_sort``: see the module docstring (defaults = the release).
    """

    pad_multiple = 1  # pads itself to the window

    def __init__(
        self,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 48,
        d_state: int = 8,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (4, 4, 4, 4),
        window_size: int = 16,
        inner_rank: int = 32,
        num_tokens: int = 64,
        convffn_kernel_size: int = 5,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        patch_norm: bool = True,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
        ffn: str = "conv",
        routing_noise: bool = True,
        stable_sort: bool = False,
        scan_backend: str = "auto",
    ):
        super().__init__()
        check_body(depths, resi_connection)
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads ({list(num_heads)}) needs one entry per group (depths {list(depths)})")
        if window_size < 2 or window_size % 2:
            raise ValueError(f"window_size must be even and >= 2 (shifted by half), got {window_size}")
        if ffn not in FFNS:
            raise ValueError(f"unknown ffn {ffn!r}; valid: {list(FFNS)}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"unknown upsampler {upsampler!r}; valid: {list(UPSAMPLERS)}")
        self.img_size, self.img_range, self.upscale, self.upsampler = img_size, img_range, upscale, upsampler
        self.window_size = window_size
        # A plain attribute, not a buffer: the release keeps it out of the state dict.
        self.mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("relative_position_index_SA", relative_position_index(window_size))
        self._mask_key, self._mask = None, None  # shift_mask's cache (not state: sizes vary)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        self.layers = nn.ModuleList([
            ASSB(embed_dim, int(depth), d_state=d_state, num_heads=int(heads), window_size=window_size,
                 inner_rank=inner_rank, num_tokens=num_tokens, convffn_kernel_size=convffn_kernel_size,
                 mlp_ratio=mlp_ratio, ffn=ffn, qkv_bias=qkv_bias, routing_noise=routing_noise,
                 stable_sort=stable_sort, scan_backend=scan_backend)
            for depth, heads in zip(depths, num_heads)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        for name, module in make_upsampler(upsampler, upscale, embed_dim, 64, in_chans).items():
            self.add_module(name, module)
        self.apply(init_transformer_weights)

    def shift_mask(self, size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The shifted-window attention mask for an H×W map, kept on ``device`` for the last size.

        The release rebuilds it on the CPU and copies it at every forward (1 GiB at 1024²); the
        values are the same, so one copy per size is kept instead.
        """
        key = (*size, str(device), dtype)
        if self._mask_key != key:
            mask = shifted_window_mask(*size, self.window_size, self.window_size // 2)
            self._mask = mask.to(device=device, dtype=dtype)
            self._mask_key = key
        return self._mask

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), H and W multiples of the window -> deep features (B, C, H, W)."""
        size = (x.shape[2], x.shape[3])
        mask = self.shift_mask(size, x.device, x.dtype)  # (nW, ws², ws²)
        x = self.patch_embed(x)  # (B, H·W, C)
        for layer in self.layers:
            x = layer(x, size, self.relative_position_index_SA, mask)
        return tokens_to_map(self.norm(x), *size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.window_size)
        x = reconstruct_image(self, x)
        return x[..., :h * self.upscale, :w * self.upscale]


class MambaIRv2Light(MambaIRv2):
    """The lightweight-SR release (``MambaIRv2Light``): the same network with gated-MLP FFNs."""

    def __init__(self, **options):
        if options.setdefault("ffn", "gated") != "gated":
            raise ValueError(f"MambaIRv2Light uses ffn='gated', got {options['ffn']!r}; use MambaIRv2 for 'conv'")
        super().__init__(**options)
