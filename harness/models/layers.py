"""Building blocks shared by EAMamba and the Restormer-layout baselines.

Module and parameter names follow the released code (``body.weight``, ``project_in``, ...)
so official checkpoints load strictly into every network assembled from these parts.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.ops import norm_triton

# --- GPU fast paths ----------------------------------------------------------------------------
# A module with a GPU specialisation decides at construction whether it may take it (its
# ``fast_path`` attribute, by default ``fast_paths_enabled()``, as timm's fused-attention flag).
# Its ``forward`` is the reference math unless that flag is on and the input is one the
# specialisation serves (a CUDA tensor in eager mode), where ``forward_fast`` computes the same
# values faster. Tests compare the two; FLOP counters and torch.compile always see the reference.

_fast_paths = True


def fast_paths_enabled() -> bool:
    """Whether modules built now take their GPU fast paths (default True)."""
    return _fast_paths


@contextlib.contextmanager
def fast_paths(enabled: bool):
    """Build the modules created inside the block with (True) or without (False) their fast paths."""
    global _fast_paths
    previous, _fast_paths = _fast_paths, bool(enabled)
    try:
        yield
    finally:
        _fast_paths = previous


def resolve_fast_path(fast_path: bool | None) -> bool:
    """A module's ``fast_path`` argument: None takes ``fast_paths_enabled()``."""
    return fast_paths_enabled() if fast_path is None else bool(fast_path)


def gpu_eager(x: torch.Tensor) -> bool:
    """A CUDA tensor outside tracing and compilation (which must see ordinary operators)."""
    return x.is_cuda and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


class _WithBiasNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W), statistics over C
        mu = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight[:, None, None] + self.bias[:, None, None]


class _BiasFreeNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BiasFree still divides by the variance around the mean but does not subtract it.
        var = x.var(1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + 1e-5) * self.weight[:, None, None]


class ChannelLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels of a (B, C, H, W) map, Restormer's "LayerNorm".

    Written with elementary ops (mean, var), as the releases do: FLOP counters in the papers'
    convention then charge it nothing, unlike ``nn.LayerNorm``. The releases normalise a
    (B, H·W, C) transposed view; reducing over dim 1 of the map itself gives the same values
    (bit-identical on CPU) without strided elementwise kernels. Fast path: float32 maps on a GPU
    go through ``harness.ops.norm_triton``, the same computation in one kernel each way (the
    elementary ops are about eight kernels per call, twice that backwards).
    """

    def __init__(self, channels: int, norm_type: str = "WithBias", fast_path: bool | None = None):
        super().__init__()
        if norm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"norm_type must be 'WithBias' or 'BiasFree', got {norm_type!r}")
        self.body = _WithBiasNorm(channels) if norm_type == "WithBias" else _BiasFreeNorm(channels)
        self.fast_path = resolve_fast_path(fast_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path and norm_triton.can_use(x):
            return self.forward_fast(x)
        return self.body(x)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The norm as one Triton kernel (float32, CUDA or the Triton interpreter)."""
        return norm_triton.channel_layer_norm(x, self.body.weight, getattr(self.body, "bias", None))


class OverlapPatchEmbed(nn.Module):
    """3×3 convolution from image channels to the network width."""

    def __init__(self, in_channels: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve resolution, double channels: conv C -> C/2, then PixelUnshuffle(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double resolution, halve channels: conv C -> 2C, then PixelShuffle(2)."""

    def __init__(self, channels: int, fast_path: bool | None = None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2)
        )
        self.fast_path = resolve_fast_path(fast_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast_path and gpu_eager(x) and x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32
                and not torch.is_grad_enabled()):
            return self.forward_fast(x)
        return self.body(x)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution through PyTorch's own kernel (im2col + cuBLAS) instead of cuDNN:
        for these wide 3×3 convolutions in strict fp32 without gradients, cuDNN's choice is the
        slower one at every size measured, and at a 512² input (512 -> 1024 channels at 64×64)
        it asks for a workspace of tens of GB (``harness.bench.gpu_pointwise --model-convs``
        measures it; with TF32 allowed cuDNN is faster)."""
        conv, shuffle = self.body
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            return shuffle(conv(x))


def batched_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a batch of matrices on either side and a plain matrix on at most one, through
    ``mm`` / ``bmm``, which take transposed operands as they are (``matmul`` copies a transposed
    batch of more than one, and a plain matrix on the left)."""
    batch = a.shape[0] if a.dim() == 3 else b.shape[0]
    if batch == 1:
        return torch.mm(a[0] if a.dim() == 3 else a, b[0] if b.dim() == 3 else b).unsqueeze(0)
    a = a if a.dim() == 3 else a.expand(batch, -1, -1)
    b = b if b.dim() == 3 else b.expand(batch, -1, -1)
    return torch.bmm(a, b)


def pointwise_product(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution of a contiguous NCHW map with a (C_out, C_in) weight, as W·x on the
    (C, H·W) view: (B, C_out, H, W), contiguous."""
    b, c, h, w = x.shape
    y = batched_mm(weight, x.view(b, c, h * w))  # (B, C_out, H·W)
    if bias is not None:
        y = y + bias[:, None]
    return y.view(b, weight.shape[0], h, w)


# --- channel mixers ------------------------------------------------------------------------

class SimpleGateFFN(nn.Module):
    """NAFNet's SimpleGate as a mixer: 1×1 to ``hidden``, multiply its halves, 1×1 back."""

    def __init__(self, dim: int, expansion: float = 2.0, bias: bool = False, fast_path: bool | None = None):
        super().__init__()
        hidden = int(dim * expansion)
        if hidden % 2:
            raise ValueError(f"the simple mixer needs an even hidden width, got int({dim}*{expansion})={hidden}")
        self.project_in = nn.Conv2d(dim, hidden, kernel_size=1, bias=bias)
        self.project_out = nn.Conv2d(hidden // 2, dim, kernel_size=1, bias=bias)
        self.fast_path = resolve_fast_path(fast_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path and gpu_eager(x) and x.is_contiguous():
            return self.forward_fast(x)
        x1, x2 = self.project_in(x).chunk(2, dim=1)
        return self.project_out(x1 * x2)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same mixer on a contiguous NCHW map with dense halves: one product (or convolution)
        per half, since the chunks of one output are strided at batch > 1 (and so would be the
        multiply and its backward). cuBLAS products beat cuDNN's strict-fp32 1×1 convolutions at
        these shapes (``harness.bench.gpu_pointwise``), except for the weight gradient at batch > 1:
        there the batched product is a bmm with a small output and a long reduction, which cuBLAS
        runs on a few blocks, so training at batch > 1 keeps the convolutions."""
        products = not (torch.is_grad_enabled() and x.shape[0] > 1)
        half = self.project_in.out_channels // 2
        w_in, b_in = self.project_in.weight, self.project_in.bias

        def project_half(rows: slice) -> torch.Tensor:
            w, b = w_in[rows], None if b_in is None else b_in[rows]
            return pointwise_product(w.flatten(1), b, x) if products else F.conv2d(x, w, b)

        gated = project_half(slice(None, half)) * project_half(slice(half, None))
        if products:
            return pointwise_product(self.project_out.weight.flatten(1), self.project_out.bias, gated)
        return self.project_out(gated)


class GDFN(nn.Module):
    """Restormer's gated-Dconv feed-forward network."""

    def __init__(self, dim: int, expansion: float = 2.66, bias: bool = False):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class FFN(nn.Module):
    """Plain point-wise MLP: 1×1, GELU, 1×1."""

    def __init__(self, dim: int, expansion: float = 2.0, bias: bool = False):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden, kernel_size=1, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(F.gelu(self.project_in(x)))


class CCA(nn.Module):
    """Conv + channel-attention mixer: 1×1, depthwise 3×3, squeeze-excite gate, 1×1."""

    def __init__(self, dim: int, expansion: float = 2.0, bias: bool = False):
        super().__init__()
        del expansion  # width-preserving by design; accepted so all mixers share a signature
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=bias)
        self.ca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, dim, kernel_size=1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, kernel_size=1, bias=bias),
            nn.Sigmoid(),
        )
        self.conv3 = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        return self.conv3(x * self.ca(x))


MIXERS = {"simple": SimpleGateFFN, "gdfn": GDFN, "ffn": FFN, "cca": CCA}


def make_mixer(kind: str, dim: int, expansion: float, bias: bool) -> nn.Module:
    """Build the channel mixer named ``kind``; errors list the valid names."""
    cls = MIXERS.get(str(kind).lower())
    if cls is None:
        raise ValueError(f"unknown channel mixer {kind!r}; valid mixers: {sorted(MIXERS)}")
    return cls(dim, expansion, bias)


# --- initialisation shared by the transformer-style baselines (MambaIR, SwinIR) --------------

@torch.no_grad()
def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """timm's ``trunc_normal_(t, std)``: it truncates at ±2 absolute (±100 std for std 0.02), so
    normal + clamp is the same draw, without the slow inverse-erf sampling (5 s for SwinIR)."""
    return t.normal_(0.0, std).clamp_(-2.0, 2.0)


def init_transformer_weights(m: nn.Module) -> None:
    """The releases' init: trunc-normal Linear weights, zero biases, unit LayerNorms.

    Parameters that are not Linear/LayerNorm (e.g. the SSM's A_logs, Ds) keep their own init.
    """
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
