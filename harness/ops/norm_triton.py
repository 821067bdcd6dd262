"""Restormer's per-pixel LayerNorm over channels, as one Triton kernel each way.

``ChannelLayerNorm`` written in elementary ops costs about eight kernels per call on a GPU
(two reductions and broadcast elementwise ops) and twice that in the backward pass; an
EAMamba forward has 82 of them. Here one program loads a (channels × pixels) tile of the
(B, C, H, W) map, NCHW or NHWC memory (the unit stride is a compile-time fact), takes the mean and
the variance around it over the channels (two passes over registers, as the elementary version
does: no sum-of-squares cancellation), and writes the normalised tile; the backward kernel
recomputes x̂ from the saved mean and 1/σ and writes dx and per-program partial sums of the
weight and bias gradients.

WithBias:  y = (x − μ)/σ · w + b.      BiasFree:  y = x/σ · w  (σ still taken around μ).
σ = sqrt(var + eps), var the biased variance over channels.

``TRITON_INTERPRET=1`` (set before import) runs the kernels on CPU tensors for the tests.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TILE_ELEMENTS = 4096  # channels × pixels per program (registers: 32 per thread at 4 warps)
MIN_BLOCK_P = 32  # pixels per program at least: 128-byte runs along pixels in NCHW memory


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


if triton is not None:

    @triton.jit
    def _offsets(bi, offs_c, offs_p, s_b, s_c, s_p, PIX_UNIT: tl.constexpr):
        """(channels × pixels) element offsets in one batch item: 32-bit, with the unit stride
        known to the compiler (NCHW: pixels; NHWC: channels) so the accesses vectorise."""
        if PIX_UNIT:
            return bi * s_b, offs_c[:, None] * s_c + offs_p[None, :]
        else:
            return bi * s_b, offs_c[:, None] + offs_p[None, :] * s_p

    @triton.jit
    def _norm_tile(C, P, BC: tl.constexpr, BP: tl.constexpr):
        """A norm kernel's program (pixel block, batch item): its channel and pixel offsets and masks."""
        pb = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        offs_c = tl.arange(0, BC)
        offs_p = pb * BP + tl.arange(0, BP)
        c_ok = offs_c < C
        p_ok = offs_p < P
        return pb, bi, offs_c, offs_p, c_ok, p_ok, c_ok[:, None] & p_ok[None, :]

    @triton.jit
    def _cln_fwd_kernel(x_ptr, w_ptr, b_ptr, z_ptr, y_ptr, mean_ptr, rstd_ptr, C, P, sx_b, sx_c, sx_p, eps,
                        BIAS_FREE: tl.constexpr, PIX_UNIT: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
                        BP: tl.constexpr):
        """One (pixel block, batch item): y, and the per-pixel mean and 1/σ for the backward.
        y (and the gate z) have x's strides. GATE: y = norm(x) · silu(z)."""
        pb, bi, offs_c, offs_p, c_ok, p_ok, m = _norm_tile(C, P, BC, BP)
        base, off = _offsets(bi, offs_c, offs_p, sx_b, sx_c, sx_p, PIX_UNIT)
        x = tl.load(x_ptr + base + off, mask=m, other=0.0)
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(m, x - mean[None, :], 0.0)
        var = tl.sum(xc * xc, axis=0) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0)
        if BIAS_FREE:
            y = x * rstd[None, :] * w[:, None]
        else:
            b = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0)
            y = xc * rstd[None, :] * w[:, None] + b[:, None]
        if GATE:
            z = tl.load(z_ptr + base + off, mask=m, other=0.0)
            y = y * (z / (1.0 + tl.exp(-z)))
        tl.store(y_ptr + base + off, y, mask=m)
        tl.store(mean_ptr + bi * P + offs_p, mean, mask=p_ok)
        tl.store(rstd_ptr + bi * P + offs_p, rstd, mask=p_ok)

    @triton.jit
    def _cln_bwd_kernel(x_ptr, w_ptr, b_ptr, z_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr, db_ptr, C, P,
                        sx_b, sx_c, sx_p, sg_b, sg_c, sg_p, NPB,
                        BIAS_FREE: tl.constexpr, PIX_UNIT: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
                        BP: tl.constexpr):
        """dx (x's strides) and this program's partial sums of dw, db (row pid of (programs, C)).
        dy has x's memory format (the launcher makes it so). GATE: the output was n · silu(z) with
        n the norm's output: dz = dy · n · silu'(z) (z, dz with x's strides), and the norm's
        output gradient is dy · silu(z).

        WithBias: dx = (g − mean_c g − x̂ mean_c(g x̂)) / σ with g = dy·w, x̂ = (x − μ)/σ.
        BiasFree: dx = g/σ − (x − μ) Σ_c(g x) / (C σ³).
        """
        pb, bi, offs_c, offs_p, c_ok, p_ok, m = _norm_tile(C, P, BC, BP)
        base, off = _offsets(bi, offs_c, offs_p, sx_b, sx_c, sx_p, PIX_UNIT)
        gbase, goff = _offsets(bi, offs_c, offs_p, sg_b, sg_c, sg_p, PIX_UNIT)
        x = tl.load(x_ptr + base + off, mask=m, other=0.0)
        dy = tl.load(dy_ptr + gbase + goff, mask=m, other=0.0)
        mean = tl.load(mean_ptr + bi * P + offs_p, mask=p_ok, other=0.0)
        rstd = tl.load(rstd_ptr + bi * P + offs_p, mask=p_ok, other=0.0)
        w = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0)
        xc = tl.where(m, x - mean[None, :], 0.0)
        if GATE:
            z = tl.load(z_ptr + base + off, mask=m, other=0.0)
            sig = 1.0 / (1.0 + tl.exp(-z))
            if BIAS_FREE:
                n = x * rstd[None, :] * w[:, None]
            else:
                n = xc * rstd[None, :] * w[:, None] + tl.load(b_ptr + offs_c, mask=c_ok, other=0.0)[:, None]
            tl.store(dz_ptr + base + off, dy * n * sig * (1.0 + z * (1.0 - sig)), mask=m)
            dy = dy * (z * sig)
        g = dy * w[:, None]
        if BIAS_FREE:
            xr = x * rstd[None, :]
            dw = tl.sum(dy * xr, axis=1)
            s = tl.sum(g * x, axis=0)
            dx = g * rstd[None, :] - xc * (s * rstd * rstd * rstd / C)[None, :]
        else:
            xhat = xc * rstd[None, :]
            dw = tl.sum(dy * xhat, axis=1)
            db = tl.sum(dy, axis=1)
            mg = tl.sum(g, axis=0) / C
            mgx = tl.sum(g * xhat, axis=0) / C
            dx = (g - mg[None, :] - xhat * mgx[None, :]) * rstd[None, :]
            tl.store(db_ptr + (bi * NPB + pb) * C + offs_c, db, mask=c_ok)
        tl.store(dx_ptr + base + off, dx, mask=m)
        tl.store(dw_ptr + (bi * NPB + pb) * C + offs_c, dw, mask=c_ok)


def _blocks(C: int) -> tuple[int, int, int]:
    BC = _next_pow2(C)
    BP = max(MIN_BLOCK_P, _next_pow2(max(1, TILE_ELEMENTS // BC)))
    if INTERPRET:
        BP = min(BP, 8)
    warps = min(16, max(4, BC * BP // 1024))
    return BC, BP, warps


def _layout(t: torch.Tensor) -> torch.Tensor:
    """t as NCHW or NHWC memory (a copy only when it is neither), checked for 32-bit offsets."""
    if t.numel() // max(1, t.shape[0]) >= 2 ** 31:
        raise ValueError(f"channel_layer_norm: one item of a {tuple(t.shape)} map spans 2^31 elements or more")
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _bcp(t: torch.Tensor) -> dict:
    """(batch, channel, pixel) strides and which of channel / pixel is the unit stride."""
    return dict(s_b=t.stride(0), s_c=t.stride(1), s_p=t.stride(3), PIX_UNIT=t.is_contiguous())


class _ChannelLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, z, eps):
        x = _layout(x)
        B, C, H, W = x.shape
        P = H * W
        BC, BP, warps = _blocks(C)
        y = torch.empty_like(x)  # same memory format
        mean = torch.empty(B, P, device=x.device, dtype=x.dtype)
        rstd = torch.empty_like(mean)
        bias_free, gate = bias is None, z is not None
        if gate and z.stride() != x.stride():
            z = torch.empty_like(x).copy_(z)
        lay = _bcp(x)
        _cln_fwd_kernel[(triton.cdiv(P, BP), B)](
            x, weight, weight if bias_free else bias, z if gate else x, y, mean, rstd, C, P,
            lay["s_b"], lay["s_c"], lay["s_p"], eps, BIAS_FREE=bias_free, PIX_UNIT=lay["PIX_UNIT"], GATE=gate,
            BC=BC, BP=BP, num_warps=warps)
        ctx.save_for_backward(x, weight, bias, z, mean, rstd)
        ctx.bias_free, ctx.gate = bias_free, gate
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, z, mean, rstd = ctx.saved_tensors
        lay = _bcp(x)
        dy = dy.contiguous(memory_format=torch.contiguous_format if lay["PIX_UNIT"] else torch.channels_last)
        g = _bcp(dy)
        B, C, H, W = x.shape
        P = H * W
        BC, BP, warps = _blocks(C)
        npb = triton.cdiv(P, BP)
        dx = torch.empty_like(x)
        dz = torch.empty_like(x) if ctx.gate else None
        dw = torch.empty(B * npb, C, device=x.device, dtype=x.dtype)
        db = None if ctx.bias_free else torch.empty_like(dw)
        _cln_bwd_kernel[(npb, B)](
            x, weight, weight if bias is None else bias, x if z is None else z, dy, mean, rstd, dx,
            dx if dz is None else dz, dw, dw if db is None else db, C, P, lay["s_b"], lay["s_c"], lay["s_p"],
            g["s_b"], g["s_c"], g["s_p"], npb, BIAS_FREE=ctx.bias_free, PIX_UNIT=lay["PIX_UNIT"], GATE=ctx.gate,
            BC=BC, BP=BP, num_warps=warps)
        return dx, dw.sum(0), None if db is None else db.sum(0), dz, None


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
                       ) -> torch.Tensor:
    """Per-pixel LayerNorm over the channels of a (B, C, H, W) float32 map (``bias=None``:
    BiasFree), differentiable in x, weight and bias."""
    if x.dim() != 4 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"channel_layer_norm: x must be (B, {weight.shape[0]}, H, W), got {tuple(x.shape)}")
    return _ChannelLayerNorm.apply(x, weight, bias, None, float(eps))


def layer_norm_last_dim(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                        gate: torch.Tensor | None = None) -> torch.Tensor:
    """``F.layer_norm`` over the last dim of a (B, L, C) tensor with unit stride along C (times
    ``silu(gate)`` when given, gate (B, L, C)), by the same kernels: a (B, C, 1, L) channels-last
    view of it is a map normalised over channels."""
    if x.dim() != 3 or x.stride(2) != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"layer_norm_last_dim: x must be (B, L, {weight.shape[0]}) with unit stride along the "
                         f"last dim, got {tuple(x.shape)} strides {x.stride()}")
    if bias is None:  # None would mean BiasFree here, not F.layer_norm without bias
        raise ValueError("layer_norm_last_dim: bias is required")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"layer_norm_last_dim: gate {tuple(gate.shape)} must match x {tuple(x.shape)}")
    as_map = lambda t: t.transpose(1, 2).unsqueeze(2)  # noqa: E731  (B, C, 1, L) view
    y = _ChannelLayerNorm.apply(as_map(x), weight, bias, None if gate is None else as_map(gate), float(eps))
    return y.squeeze(2).transpose(1, 2)


def can_use(x: torch.Tensor) -> bool:
    """True when the kernels here can replace the torch ops for x: float32 on a CUDA device (or on
    CPU under the interpreter), outside torch.compile and tracing (which see the elementary ops:
    Inductor fuses them, FLOP counters charge them nothing). Modules ask this only on their fast
    path (``harness.models.layers``)."""
    if triton is None or x.dtype != torch.float32:
        return False
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())
