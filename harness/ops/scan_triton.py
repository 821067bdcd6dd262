"""Selective scan in Triton (forward and backward), and the multi-route scan with routes fused in.

The recurrence x_t = a_t ⊙ x_{t-1} + b_t (a_t = exp(Δ_t A), b_t = Δ_t B_t u_t, per channel and
state) is cut three ways so that batch-1 shapes fill a GPU: over batch, over blocks of channels
of one B/C group (they share the group's B_t, C_t, read once per block), and over segments of
the sequence. Each program holds a (channels × states × steps) tile in registers and scans the
steps with ``tl.associative_scan`` on pairs (a, b), whose combine (a₁, b₁)∘(a₂, b₂) =
(a₁a₂, a₂b₁ + b₂) is the composition of two steps: no division and no exp of a cumulative sum,
so nothing can overflow (products of a ∈ (0, 1] only underflow towards 0).

Segments are joined by a two-pass scheme:
1. every segment finds its end state from a zero start, Σ_t exp(A Σ_{s>t} Δ_s) b_t tile by
   tile (a weighted sum, no scan: every exponent is ≤ 0), and the product of its a_t;
2. one short sequential chain per (batch, channel block) turns those into each segment's true
   starting state (carry_{s+1} = end_s + prod_s ⊙ carry_s);
3. every segment rescans from its true start and writes y_t = C_t · x_t + D u_t.
When one segment already gives enough programs, passes 1-2 are skipped.

The tile backward pass runs the adjoint g_t = a_{t+1} g_{t+1} + C_t dy_t backwards in time with
the same segment scheme (reverse associative scans), recomputes the forward states of each tile
from stored tile-start states, and forms every gradient in one sweep: du, dΔ (through the
softplus and the bias), dA, dB, dC (per channel block, summed afterwards), dD.

Route fusion: with ``idx`` (one permutation of the H·W positions per B/C group, int32), step t
of group k reads and writes position ``idx[k, t]`` of raster-ordered tensors, so the permuted
copies of the multi-route scan and their inverses are never materialised. For the ``add`` merge
the K routes' outputs (and input gradients) are accumulated with atomic adds. (With the tile
backward, the fused scan gathers route-ordered copies instead, which those kernels read faster
than through the index; ``ROUTED_BACKWARD`` switches back.)

A second forward kernel (``FORWARD_KERNEL = "step"``) walks the steps one at a time with one
thread per channel holding all of that channel's states in registers, so neither the recurrence
nor the sum over states needs any communication between threads; its strides are run-time
arguments, and the fused multi-route scan feeds it channels-last tensors (one contiguous run of
channels per step and route group). The states are held as chunks of four, so a thread reads
four states of B or C in one 16-byte load (when the rows are aligned). Each iteration issues
its loads before its stores and reads the route positions one iteration ahead. Its segments are
joined by the same two-pass scheme, with the chain of pass 2 done by associative scans over
blocks of segments.

The default backward (``BACKWARD_KERNEL = "step"``) is the step kernel's adjoint: the forward
states are recomputed once and stored for every step, then the adjoint is walked backwards one
step at a time, one thread per channel, with the same layout, routing and segment chain (run
from the right); the sums over channels that dB and dC need run across lanes.

The projections in ``fused_multi_route_scan`` are dense matrix products with block-diagonal
weights on channels-last activations, so nothing around the scan is transposed or copied.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the same kernels on CPU tensors,
which is how the tests check their logic without a GPU.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from harness.ops.selective_scan import ScanBackend, register_backend

try:  # Triton is optional: without it the backend registers as unavailable.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Tuning knobs (element budgets of one program's (channels × states × steps) tile, programs
# wanted per multiprocessor, warps). Module-level so benchmarks can sweep them.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 2048
MAX_BLOCK_D = 8
PROGRAMS_PER_SM = 4
MAX_SEGMENTS = 512
FWD_WARPS = 4
BWD_WARPS = 4
# Forward pass: "step" (one step per loop iteration, one thread per channel with its states in
# registers) or "tile" (associative scans over tiles of steps, as the backward pass). Measured on
# an H200 (b1 d64 256², all_around routes, fp32): step 0.37 ms channels-last (0.47 channel-major),
# tile 0.95 ms; at 1024² 4.2 ms against 20 ms.
FORWARD_KERNEL = "step"
STEP_WARPS = 1  # the step kernel's warps per program: BD = 32 · STEP_WARPS channels
STEP_UNROLL = 1  # H200 runs 16-17: fastest or tied of 1, 2, 4, 8 at 3 of 4 swept shapes once loads preceded stores
STEP_WARPS_PER_SM = 32  # segments are cut until about this many warps per multiprocessor
STEP_MAX_SEGMENTS = 4096
STEP_MIN_SEGMENT = 32
STEP_MAXNREG = None  # register cap per thread for the step kernel (None: the compiler's choice)
# Backward pass: "step" (the adjoint of the step kernel, one thread per channel, on stored
# forward states) or "tile" (session 1's tile kernels).
BACKWARD_KERNEL = "step"
STEP_BWD_UNROLL = 1  # H200 run 8: fastest of 1, 2, 4 at all four swept shapes; run 17 (16-byte loads): 2 was
# 6-34 % faster at 3 shapes and 35 % slower at b8 d128 64², not yet timed in the model
CARRY_BLOCK_S = 64  # segments per associative scan in the segment carry
CARRY_BLOCK_M = 32
CARRY_WARPS = 4
# The interpreter runs tl.associative_scan element by element (minutes for a small tile); the
# kernels use an equivalent step loop there unless this is set (tests set it for tiny tiles).
ASSOC_SCAN_IN_INTERPRETER = False


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# Sizes are run-time values: one compiled kernel serves every resolution and layer width
# (Triton would otherwise compile a variant per divisibility class and per value 1).
_RUNTIME_INTS = ["L", "U_CH", "NCH", "G", "DG", "N", "NBLK_D", "SEG_TILES", "NSEG", "NTILES"]

if triton is not None:

    @triton.jit
    def _combine(a_l, b_l, a_r, b_r):
        # Compose step l then step r: x -> a_r (a_l x + b_l) + b_r. With reverse=True the same
        # function scans g_t = a_t g_{t+1} + b_t.
        return a_l * a_r, a_r * b_l + b_r

    @triton.jit
    def _scan(a, b, BT: tl.constexpr, REVERSE: tl.constexpr, SEQ: tl.constexpr):
        """Inclusive scan of steps (a, b) along axis 2: (∏a, x) with x_t = a_t x_{t-1} + b_t,
        or x_t = a_t x_{t+1} + b_t when REVERSE.

        SEQ replaces ``tl.associative_scan`` by a step loop of whole-tile operations: the same
        result, for the interpreter, whose associative_scan combines element by element.
        """
        if SEQ:
            j = tl.arange(0, BT)[None, None, :]
            P = a
            X = b
            pa = tl.sum(tl.where(j == 0, a, 0.0), axis=2)
            xb = pa
            for s in tl.static_range(BT):
                if REVERSE:
                    jj = BT - 1 - s
                else:
                    jj = s
                sel = j == jj
                aj = tl.sum(tl.where(sel, a, 0.0), axis=2)
                bj = tl.sum(tl.where(sel, b, 0.0), axis=2)
                if s == 0:
                    pa = aj
                    xb = bj
                else:
                    pa = pa * aj
                    xb = aj * xb + bj
                P = tl.where(sel, pa[:, :, None], P)
                X = tl.where(sel, xb[:, :, None], X)
            return P, X
        else:
            return tl.associative_scan((a, b), 2, _combine, reverse=REVERSE)

    @triton.jit
    def _suffix_sum(x, BT: tl.constexpr, SEQ: tl.constexpr):
        """Σ_{s > t} x[:, s] over the tile's steps, for every t: (BD, BT)."""
        if SEQ:
            j = tl.arange(0, BT)
            return tl.sum(tl.where(j[None, None, :] > j[None, :, None], x[:, None, :], 0.0), axis=2)
        else:
            return tl.cumsum(x, axis=1, reverse=True) - x

    @triton.jit
    def _delta_of(raw, SOFTPLUS: tl.constexpr):
        if SOFTPLUS:
            # softplus with torch's threshold (x > 20 -> x) and an accurate log1p(e^x).
            e = tl.exp(raw)
            w = 1.0 + e
            lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
            return tl.where(raw > 20.0, raw, lp)
        else:
            return raw

    @triton.jit
    def _last(X, BT: tl.constexpr):
        # X[:, :, BT - 1] of a (BD, BN, BT) tile.
        t = tl.arange(0, BT)
        return tl.sum(tl.where((t == BT - 1)[None, None, :], X, 0.0), axis=2)

    @triton.jit
    def _first(X, BT: tl.constexpr):
        t = tl.arange(0, BT)
        return tl.sum(tl.where((t == 0)[None, None, :], X, 0.0), axis=2)

    @triton.jit
    def _positions(idx_ptr, grp, offs_t, t_ok, L, ROUTED: tl.constexpr):
        if ROUTED:
            return tl.load(idx_ptr + grp * L + offs_t, mask=t_ok, other=0).to(tl.int64)
        else:
            return offs_t.to(tl.int64)

    @triton.jit
    def _program_coords(pid, G, NBLK_D, DG, U_CH, BD: tl.constexpr):
        bi = pid // (G * NBLK_D)
        rem = pid % (G * NBLK_D)
        grp = rem // NBLK_D
        dblk = rem % NBLK_D
        ch_local = dblk * BD + tl.arange(0, BD)
        ch_ok = ch_local < DG
        ch = grp * DG + ch_local
        uch = ch % U_CH
        return bi, grp, dblk, ch, ch_ok, uch

    @triton.jit
    def _tile_setup(pid, A_ptr, D_ptr, bias_ptr, G, NBLK_D, DG, U_CH, N, HAS_D: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
        """A tile kernel's program: its coordinates, state masks and per-channel parameters.
        Dv / bias are zeros when the kernel has none (unused then, and compiled away)."""
        bi, grp, dblk, ch, ch_ok, uch = _program_coords(pid, G, NBLK_D, DG, U_CH, BD)
        offs_n = tl.arange(0, BN)
        n_ok = offs_n < N
        m_dn = ch_ok[:, None] & n_ok[None, :]
        ch64 = ch.to(tl.int64)
        A = tl.load(A_ptr + ch64[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
        A2 = A * 1.4426950408889634  # exp(Δ A) = exp2(Δ A log2 e)
        if HAS_D:
            Dv = tl.load(D_ptr + ch, mask=ch_ok, other=0.0)
        else:
            Dv = tl.zeros((BD,), dtype=A.dtype)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
        else:
            bias = tl.zeros((BD,), dtype=A.dtype)
        return bi.to(tl.int64), grp, dblk, ch, ch_ok, uch, ch64, offs_n, n_ok, m_dn, A, A2, Dv, bias

    @triton.jit
    def _delta_tile(dt_rows, pos, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """(raw, Δ) of a (channels × steps) tile: raw = dt (+ bias), Δ = softplus(raw) or raw,
        0 where masked."""
        raw = tl.load(dt_rows[:, None] + pos[None, :], mask=mask, other=0.0)
        if HAS_BIAS:
            raw = raw + bias[:, None]
        return raw, tl.where(mask, _delta_of(raw, SOFTPLUS), 0.0)

    @triton.jit(do_not_specialize=_RUNTIME_INTS)
    def _fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, idx_ptr, y_ptr,
        hin_ptr, end_ptr, prod_ptr, st_ptr,
        L, U_CH, NCH, G, DG, N, NBLK_D, SEG_TILES, NSEG, NTILES,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        ROUTED: tl.constexpr, ACCUM: tl.constexpr, HAS_CARRY: tl.constexpr,
        END_ONLY: tl.constexpr, STORE_STATES: tl.constexpr, WRITE_Y: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, SEQ: tl.constexpr,
    ):
        """One (batch, group, channel block, segment): scan the segment's tiles in order.

        END_ONLY: pass 1 (zero start; write end state and product of decays).
        HAS_CARRY: start from hin (pass 3). STORE_STATES: write the state before every tile
        (for the backward pass). WRITE_Y: write y = C·x + D u (stored, or added if ACCUM).
        """
        pid = tl.program_id(0)
        seg = tl.program_id(1)
        bi64, grp, dblk, ch, ch_ok, uch, ch64, offs_n, n_ok, m_dn, A, A2, Dv, bias = _tile_setup(
            pid, A_ptr, D_ptr, bias_ptr, G, NBLK_D, DG, U_CH, N, HAS_D, HAS_BIAS, BD, BN)
        u_rows = u_ptr + (bi64 * U_CH + uch.to(tl.int64)) * L  # (BD,) row pointers
        dt_rows = dt_ptr + (bi64 * NCH + ch64) * L
        y_rows = y_ptr + (bi64 * U_CH + uch.to(tl.int64)) * L
        B_rows = B_ptr + ((bi64 * G + grp) * N + offs_n) * L  # (BN,)
        C_rows = C_ptr + ((bi64 * G + grp) * N + offs_n) * L
        state_off = ((bi64 * NCH + ch64)[:, None] * NSEG + seg) * N + offs_n[None, :]
        if HAS_CARRY:
            h = tl.load(hin_ptr + state_off, mask=m_dn, other=0.0)
        else:
            h = tl.zeros((BD, BN), dtype=A.dtype)
        prod = tl.full((BD, BN), 1.0, dtype=A.dtype)
        first_tile = seg * SEG_TILES
        n_here = tl.minimum(SEG_TILES, NTILES - first_tile)
        for k in range(0, n_here):
            tile = first_tile + k
            offs_t = tile * BT + tl.arange(0, BT)
            t_ok = offs_t < L
            pos = _positions(idx_ptr, grp, offs_t, t_ok, L, ROUTED)
            m2 = ch_ok[:, None] & t_ok[None, :]
            raw, dlt = _delta_tile(dt_rows, pos, m2, bias, HAS_BIAS, SOFTPLUS)
            uu = tl.load(u_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            Bt = tl.load(B_rows[:, None] + pos[None, :], mask=n_ok[:, None] & t_ok[None, :], other=0.0)
            bx = (dlt * uu)[:, None, :] * Bt[None, :, :]
            if STORE_STATES:
                st_off = ((bi64 * NCH + ch64)[:, None] * NTILES + tile) * N + offs_n[None, :]
                tl.store(st_ptr + st_off, h, mask=m_dn)
            if END_ONLY:
                # Only the end state: x_end = Σ_t exp(A Σ_{s>t} Δ_s) b_t + exp(A ΣΔ) x_start. Each
                # exponent is ≤ 0, and its rounding error shrinks with the weight it produces.
                w = tl.exp2(_suffix_sum(dlt, BT, SEQ)[:, None, :] * A2[:, :, None])
                decay = tl.exp2(tl.sum(dlt, axis=1)[:, None] * A2)
                h = decay * h + tl.sum(w * bx, axis=2)
                prod = prod * decay
            else:
                a = tl.exp2(dlt[:, None, :] * A2[:, :, None])
                P, H = _scan(a, bx, BT, False, SEQ)
                H = H + P * h[:, :, None]
                if WRITE_Y:
                    Ct = tl.load(C_rows[:, None] + pos[None, :], mask=n_ok[:, None] & t_ok[None, :], other=0.0)
                    y = tl.sum(H * Ct[None, :, :], axis=1)
                    if HAS_D:
                        y = y + Dv[:, None] * uu
                    if ACCUM:
                        tl.atomic_add(y_rows[:, None] + pos[None, :], y, mask=m2)
                    else:
                        tl.store(y_rows[:, None] + pos[None, :], y, mask=m2)
                h = _last(H, BT)
        if END_ONLY:
            tl.store(end_ptr + state_off, h, mask=m_dn)
            tl.store(prod_ptr + state_off, prod, mask=m_dn)

    @triton.jit(do_not_specialize=_RUNTIME_INTS)
    def _bwd_seg_kernel(
        dt_ptr, A_ptr, C_ptr, bias_ptr, idx_ptr, dy_ptr, end_ptr, prod_ptr,
        L, U_CH, NCH, G, DG, N, NBLK_D, SEG_TILES, NSEG, NTILES,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ROUTED: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, SEQ: tl.constexpr,
    ):
        """Adjoint pass 1: each segment's g at its first step from a zero g after its end, and
        the product of a_{t+1} over its steps."""
        pid = tl.program_id(0)
        seg = tl.program_id(1)
        bi64, grp, dblk, ch, ch_ok, uch, ch64, offs_n, n_ok, m_dn, A, A2, no_d, bias = _tile_setup(
            pid, A_ptr, A_ptr, bias_ptr, G, NBLK_D, DG, U_CH, N, False, HAS_BIAS, BD, BN)
        dt_rows = dt_ptr + (bi64 * NCH + ch64) * L
        dy_rows = dy_ptr + (bi64 * U_CH + uch.to(tl.int64)) * L
        C_rows = C_ptr + ((bi64 * G + grp) * N + offs_n) * L
        g = tl.zeros((BD, BN), dtype=A.dtype)
        q = tl.full((BD, BN), 1.0, dtype=A.dtype)
        first_tile = seg * SEG_TILES
        n_here = tl.minimum(SEG_TILES, NTILES - first_tile)
        for kk in range(0, n_here):
            tile = first_tile + n_here - 1 - kk
            offs_t = tile * BT + tl.arange(0, BT)
            t_ok = offs_t < L
            pos = _positions(idx_ptr, grp, offs_t, t_ok, L, ROUTED)
            m2 = ch_ok[:, None] & t_ok[None, :]
            offs_x = offs_t + 1
            x_ok = offs_x < L
            pos_x = _positions(idx_ptr, grp, offs_x, x_ok, L, ROUTED)
            mx = ch_ok[:, None] & x_ok[None, :]
            raw_x, dlt_x = _delta_tile(dt_rows, pos_x, mx, bias, HAS_BIAS, SOFTPLUS)
            dy = tl.load(dy_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            Ct = tl.load(C_rows[:, None] + pos[None, :], mask=n_ok[:, None] & t_ok[None, :], other=0.0)
            an = tl.exp2(dlt_x[:, None, :] * A2[:, :, None])
            c = Ct[None, :, :] * dy[:, None, :]
            Q, Gs = _scan(an, c, BT, True, SEQ)
            Gs = Gs + Q * g[:, :, None]
            g = _first(Gs, BT)
            q = q * _first(Q, BT)
        state_off = ((bi64 * NCH + ch64)[:, None] * NSEG + seg) * N + offs_n[None, :]
        tl.store(end_ptr + state_off, g, mask=m_dn)
        tl.store(prod_ptr + state_off, q, mask=m_dn)

    @triton.jit(do_not_specialize=["NCH", "G", "DG", "N", "NBLK_D", "NSEG", "U_CH"])
    def _carry_kernel(
        end_ptr, prod_ptr, out_ptr, NCH, G, DG, N, NBLK_D, NSEG, U_CH,
        REVERSE: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    ):
        """Pass 2: chain the segments. out[s] = state entering segment s (from the left, or
        from the right when REVERSE)."""
        pid = tl.program_id(0)
        bi, grp, dblk, ch, ch_ok, uch = _program_coords(pid, G, NBLK_D, DG, U_CH, BD)
        offs_n = tl.arange(0, BN)
        m_dn = ch_ok[:, None] & (offs_n < N)[None, :]
        base = ((bi.to(tl.int64) * NCH + ch.to(tl.int64))[:, None] * NSEG) * N + offs_n[None, :]
        carry = tl.zeros((BD, BN), dtype=end_ptr.dtype.element_ty)
        # Two segments per iteration, both loaded before the dependent chain: the loads do not
        # wait on each other (the chain is latency-bound, not bandwidth-bound).
        for s0 in range(0, NSEG, 2):
            ok1 = (s0 + 1) < NSEG
            if REVERSE:
                off0 = base + (NSEG - 1 - s0) * N
                off1 = base + (NSEG - 2 - s0) * N
            else:
                off0 = base + s0 * N
                off1 = base + (s0 + 1) * N
            e0 = tl.load(end_ptr + off0, mask=m_dn, other=0.0)
            p0 = tl.load(prod_ptr + off0, mask=m_dn, other=0.0)
            e1 = tl.load(end_ptr + off1, mask=m_dn & ok1, other=0.0)
            p1 = tl.load(prod_ptr + off1, mask=m_dn & ok1, other=0.0)
            tl.store(out_ptr + off0, carry, mask=m_dn)
            carry = e0 + p0 * carry
            tl.store(out_ptr + off1, carry, mask=m_dn & ok1)
            carry = e1 + p1 * carry

    _STEP_RUNTIME = ["L", "U_CH", "NCH", "DG", "N", "NSEG", "SEG_LEN",
                     "su_b", "su_c", "su_l", "sd_b", "sd_c", "sd_l", "sB_b", "sB_g", "sB_l",
                     "sC_b", "sC_g", "sC_l", "sy_b", "sy_c", "sy_l"]

    @triton.jit
    def _step_program(A_ptr, D_ptr, bias_ptr, NCH, DG, U_CH, N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BD: tl.constexpr, BN: tl.constexpr, VN: tl.constexpr):
        """A step kernel's program (block of BD channels, segment, batch): its coordinates and
        per-channel parameters. A channel's states are held as BN / VN chunks, each a (VN × BD)
        tile with channels across lanes and VN states inside each thread (VN contiguous states
        of B and C are one 16-byte load). A2 = A log2 e (exp(Δ A) = exp2(Δ A2)), a tuple of
        chunks; Dv / bias are zeros when the kernel has none (unused then, and compiled away)."""
        cb = tl.program_id(0)
        seg = tl.program_id(1)
        bi = tl.program_id(2).to(tl.int64)
        ch = cb * BD + tl.arange(0, BD)
        ch_ok = ch < NCH
        grp = ch // DG
        uch = ch % U_CH
        A2 = ()
        for c in tl.static_range(BN // VN):
            offs = c * VN + tl.arange(0, VN)
            # (see the hint on B in the forward kernel)
            A2 = A2 + (tl.load(tl.max_contiguous(A_ptr + ch[None, :] * N + offs[:, None], [1, BD]),
                               mask=(offs < N)[:, None] & ch_ok[None, :], other=0.0) * 1.4426950408889634,)
        if HAS_D:
            Dv = tl.load(D_ptr + ch, mask=ch_ok, other=0.0)
        else:
            Dv = tl.zeros((BD,), dtype=A2[0].dtype)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
        else:
            bias = tl.zeros((BD,), dtype=A2[0].dtype)
        return cb, seg, bi, ch, ch_ok, grp, uch, A2, Dv, bias

    @triton.jit
    def _states_load(ptr, row, ch, ch_ok, N, NCH, BD: tl.constexpr, BN: tl.constexpr, VN: tl.constexpr,
                     extra_ok=True):
        """Chunks of the (state, channel) slab at state row ``row`` of an array laid out
        (..., state, channel): channels contiguous, so each chunk row is one coalesced load."""
        out = ()
        for c in tl.static_range(BN // VN):
            offs = c * VN + tl.arange(0, VN)
            out = out + (tl.load(tl.max_contiguous(ptr + ((row + offs)[:, None] * NCH + ch[None, :]), [1, BD]),
                                 mask=(offs < N)[:, None] & ch_ok[None, :] & extra_ok, other=0.0),)
        return out

    @triton.jit
    def _states_store(ptr, row, ch, ch_ok, N, NCH, x, BD: tl.constexpr, BN: tl.constexpr, VN: tl.constexpr):
        """Store chunks ``x`` at state row ``row`` of an array laid out (..., state, channel)."""
        for c in tl.static_range(BN // VN):
            offs = c * VN + tl.arange(0, VN)
            tl.store(tl.max_contiguous(ptr + ((row + offs)[:, None] * NCH + ch[None, :]), [1, BD]), x[c],
                     mask=(offs < N)[:, None] & ch_ok[None, :])

    @triton.jit
    def _states_zeros(dtype, BD: tl.constexpr, BN: tl.constexpr, VN: tl.constexpr):
        """Zero state chunks: a tuple of BN / VN (VN, BD) tiles."""
        out = ()
        for c in tl.static_range(BN // VN):
            out = out + (tl.zeros((VN, BD), dtype=dtype),)
        return out

    @triton.jit
    def _segment_end_store(end_ptr, prod_ptr, row, ch, ch_ok, N, NCH, x, dsum, A2, BD: tl.constexpr,
                           BN: tl.constexpr, VN: tl.constexpr):
        """Pass 1 of a segment chain: the segment's end value x and its decay product exp(Σ Δ · A)."""
        _states_store(end_ptr, row, ch, ch_ok, N, NCH, x, BD, BN, VN)
        prod = ()
        for c in tl.static_range(BN // VN):
            prod = prod + (tl.exp2(dsum[None, :] * A2[c]),)
        _states_store(prod_ptr, row, ch, ch_ok, N, NCH, prod, BD, BN, VN)

    @triton.jit
    def _step_operands(u_ptr, dt_ptr, B_ptr, C_ptr, idx_ptr, h_ptr, bi, grp, L, N, NCH, su_b, sd_b, sB_b, sB_g,
                       sC_b, sC_g):
        """Batch item bi's bases for u, Δ, B, C and the stored states (batch, step, state,
        channel), each channel's B/C group row and its route-index row."""
        return (u_ptr + bi * su_b, dt_ptr + bi * sd_b, B_ptr + bi * sB_b, C_ptr + bi * sC_b, grp * sB_g,
                grp * sC_g, idx_ptr + grp * L, h_ptr + bi * L * N * NCH)

    @triton.jit
    def _group_states_load(base, addr, ok, N, BD: tl.constexpr, BN: tl.constexpr, VN: tl.constexpr,
                           VEC: tl.constexpr):
        """B or C for each channel: its group's states at ``addr`` (group row + position · stride),
        as chunks. VEC: the rows are 16-byte aligned and N == BN, so each chunk is one 16-byte
        load per thread. Otherwise one load per state, with channels across lanes (the hint
        keeps the compiler's coalescing analysis from putting the states there)."""
        out = ()
        for c in tl.static_range(BN // VN):
            offs = c * VN + tl.arange(0, VN)
            ptrs = base + (addr[None, :] + offs[:, None])
            if VEC:
                v = tl.load(tl.max_contiguous(tl.multiple_of(ptrs, [16, 1]), [VN, 1]), mask=ok[None, :], other=0.0)
            else:
                v = tl.load(tl.max_contiguous(ptrs, [1, BD]), mask=(offs < N)[:, None] & ok[None, :],
                            other=0.0)
            out = out + (v,)
        return out

    @triton.jit
    def _step_positions(idx_rows, t0, t_lo, t_hi, ch_ok, ROUTED: tl.constexpr, STEPS: tl.constexpr,
                        BD: tl.constexpr, REVERSE: tl.constexpr = False):
        """Each channel's position at steps t0 + j (t0 - j when REVERSE), j < STEPS, as a tuple of
        (BD,) vectors: through its group's route when ROUTED (0 outside [t_lo, t_hi)), else the
        step itself. The step kernels read these an iteration ahead of the data they point at."""
        out = ()
        for j in tl.static_range(STEPS):
            if REVERSE:
                t = t0 - j
            else:
                t = t0 + j
            if ROUTED:
                pos = tl.load(idx_rows + t, mask=ch_ok & (t >= t_lo) & (t < t_hi), other=0)
            else:
                pos = t + tl.zeros((BD,), dtype=tl.int32)
            out = out + (pos,)
        return out

    @triton.jit
    def _step_delta(pos, ok, dt_base, dt_off, sd_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """raw = dt (+ bias) at each channel's position, and Δ (0 where not ok)."""
        raw = tl.load(dt_base + (dt_off + pos * sd_l), mask=ok, other=0.0)
        if HAS_BIAS:
            raw = raw + bias
        return raw, tl.where(ok, _delta_of(raw, SOFTPLUS), 0.0)

    @triton.jit(do_not_specialize=_STEP_RUNTIME)
    def _fwd_step_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, idx_ptr, y_ptr, hin_ptr, end_ptr, prod_ptr, h_ptr,
        L, U_CH, NCH, DG, N, NSEG, SEG_LEN,
        su_b, su_c, su_l, sd_b, sd_c, sd_l, sB_b, sB_g, sB_l, sC_b, sC_g, sC_l, sy_b, sy_c, sy_l,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ROUTED: tl.constexpr,
        ACCUM: tl.constexpr, HAS_CARRY: tl.constexpr, END_ONLY: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, VN: tl.constexpr, VEC_BC: tl.constexpr, UNROLL: tl.constexpr,
        WRITE_Y: tl.constexpr = True, STORE_H: tl.constexpr = False,
    ):
        """Forward, one step at a time, one thread per channel holding all its states.

        Channels across lanes and states inside each thread, so the recurrence and
        y_t = Σ_n C_t,n x_t,n need no communication between threads, and the loads of u, Δ and
        y are one element per thread per step (contiguous across the warp when the tensors are
        channels-last: their strides are run-time arguments). B and C must have unit stride
        along the states (channels-last, (b, L, g, n) in memory); with VEC_BC each chunk of VN
        states is one 16-byte load. Offsets inside one batch item are 32-bit (the launcher
        checks the sizes), which keeps the register count down. UNROLL steps per iteration keep
        their loads in flight together; the chain between steps is one multiply-add per state.

        Program = (block of BD channels, segment, batch). END_ONLY: pass 1 (zero start; the
        segment's end state and decay product). Otherwise pass 3 (start from hin if HAS_CARRY;
        write y if WRITE_Y; write the state after every step to h, laid out (batch, step, state,
        channel), if STORE_H: the backward kernel reads it). Segment states are laid out
        (batch, segment, state, channel).
        """
        cb, seg, bi, ch, ch_ok, grp, uch, A2, Dv, bias = _step_program(
            A_ptr, D_ptr, bias_ptr, NCH, DG, U_CH, N, HAS_D, HAS_BIAS, BD, BN, VN)
        u_base, dt_base, B_base, C_base, B_row, C_row, idx_rows, h_base = _step_operands(
            u_ptr, dt_ptr, B_ptr, C_ptr, idx_ptr, h_ptr, bi, grp, L, N, NCH, su_b, sd_b, sB_b, sB_g, sC_b, sC_g)
        y_base = y_ptr + bi * sy_b
        u_off = uch * su_c  # (BD,) int32
        y_off = uch * sy_c
        dt_off = ch * sd_c
        state_row = (bi * NSEG + seg) * N
        if HAS_CARRY:
            h = _states_load(hin_ptr, state_row, ch, ch_ok, N, NCH, BD, BN, VN)
        else:
            h = _states_zeros(Dv.dtype, BD, BN, VN)
        dsum = tl.zeros((BD,), dtype=Dv.dtype)
        t_begin = seg * SEG_LEN
        t_end = tl.minimum(t_begin + SEG_LEN, L)
        # The route positions are read an iteration ahead of the data they point at, and all
        # UNROLL steps' loads are issued before the first store (a store may alias the inputs
        # as far as the compiler knows, so it never moves a load above one).
        pos_next = _step_positions(idx_rows, t_begin, t_begin, t_end, ch_ok, ROUTED, UNROLL, BD)
        for t0 in range(t_begin, t_end, UNROLL):
            pos_now = pos_next
            loaded = ()
            for j in tl.static_range(UNROLL):
                ok = ch_ok & ((t0 + j) < t_end)
                pos = pos_now[j]
                raw, dlt = _step_delta(pos, ok, dt_base, dt_off, sd_l, bias, HAS_BIAS, SOFTPLUS)
                uu = tl.load(u_base + (u_off + pos * su_l), mask=ok, other=0.0)
                Bv = _group_states_load(B_base, B_row + pos * sB_l, ok, N, BD, BN, VN, VEC_BC)
                if WRITE_Y and not END_ONLY:
                    Cv = _group_states_load(C_base, C_row + pos * sC_l, ok, N, BD, BN, VN, VEC_BC)
                else:
                    Cv = Bv  # unused
                loaded = loaded + ((pos, dlt, uu, Bv, Cv),)
            pos_next = _step_positions(idx_rows, t0 + UNROLL, t_begin, t_end, ch_ok, ROUTED, UNROLL, BD)
            for j in tl.static_range(UNROLL):
                pos, dlt, uu, Bv, Cv = loaded[j]
                t = t0 + j
                ok = ch_ok & (t < t_end)
                if HAS_D:
                    y = Dv * uu
                else:
                    y = tl.zeros((BD,), dtype=Dv.dtype)
                h_new = ()
                for c in tl.static_range(BN // VN):
                    hc = tl.exp2(dlt[None, :] * A2[c]) * h[c] + (dlt * uu)[None, :] * Bv[c]
                    if WRITE_Y and not END_ONLY:
                        y += tl.sum(hc * Cv[c], axis=0)
                    h_new = h_new + (hc,)
                h = h_new
                if END_ONLY:
                    dsum += dlt
                if WRITE_Y and not END_ONLY:
                    if ACCUM:
                        tl.atomic_add(y_base + (y_off + pos * sy_l), y, mask=ok)
                    else:
                        tl.store(y_base + (y_off + pos * sy_l), y, mask=ok)
                if STORE_H and not END_ONLY:
                    _states_store(h_base, t.to(tl.int64) * N, ch, ok, N, NCH, h, BD, BN, VN)
        if END_ONLY:
            _segment_end_store(end_ptr, prod_ptr, state_row, ch, ch_ok, N, NCH, h, dsum, A2, BD, BN, VN)

    @triton.jit
    def _partial_sum(x, BN: tl.constexpr, BD: tl.constexpr, W: tl.constexpr):
        """(BN, BD) -> (BN, BD // W): sums over each run of W channels (lanes)."""
        return tl.sum(tl.reshape(x, (BN, BD // W, W)), axis=2)

    @triton.jit(do_not_specialize=_STEP_RUNTIME + ["sdu_b", "sdu_c", "sdu_l", "sdd_b", "sdd_c", "sdd_l"])
    def _bwd_step_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, idx_ptr, dy_ptr, h_ptr, gin_ptr,
        du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, end_ptr, prod_ptr,
        L, U_CH, NCH, DG, N, NSEG, SEG_LEN,
        su_b, su_c, su_l, sd_b, sd_c, sd_l, sB_b, sB_g, sB_l, sC_b, sC_g, sC_l, sy_b, sy_c, sy_l,
        sdu_b, sdu_c, sdu_l, sdd_b, sdd_c, sdd_l,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ROUTED: tl.constexpr,
        ACCUM: tl.constexpr, HAS_CARRY: tl.constexpr, END_ONLY: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, VN: tl.constexpr, VEC_BC: tl.constexpr, W: tl.constexpr,
        UNROLL: tl.constexpr,
    ):
        """Backward of the step kernel: the adjoint walked backwards in time, one step at a time.

        With g_t = ∂loss/∂x_t and r_t = a_t g_t (what step t hands to step t-1):
        g_t = r_{t+1} + C_t dy_t, and from g_t and the stored states x_{t-1}, x_t:
        du_t = Δ_t Σ_n g_t B_t (+ D dy_t), dΔ_t = Σ_n g_t (A a_t x_{t-1} + B_t u_t) (then through
        the softplus), dA += g_t a_t x_{t-1} Δ_t, dB_t = Σ_c g_t Δ_t u_t, dC_t = Σ_c dy_t x_t.
        The sums over channels run over W lanes at a time (one partial per W channels, summed
        over a group's partials by the launcher when a group spans blocks).

        Same layout and program grid as the forward step kernel; the states x_t come from h,
        (batch, step, state, channel). END_ONLY: pass 1 of the reverse segment chain (zero r at
        the segment's end; writes r at its start and the decay product). Otherwise start from
        gin (HAS_CARRY) and write every gradient; dA per (batch, segment).
        """
        cb, seg, bi, ch, ch_ok, grp, uch, A2, Dv, bias = _step_program(
            A_ptr, D_ptr, bias_ptr, NCH, DG, U_CH, N, HAS_D, HAS_BIAS, BD, BN, VN)
        u_base, dt_base, B_base, C_base, B_row, C_row, idx_rows, h_base = _step_operands(
            u_ptr, dt_ptr, B_ptr, C_ptr, idx_ptr, h_ptr, bi, grp, L, N, NCH, su_b, sd_b, sB_b, sB_g, sC_b, sC_g)
        dy_base = dy_ptr + bi * sy_b
        du_base = du_ptr + bi * sdu_b
        ddt_base = ddt_ptr + bi * sdd_b
        # partial sums: (batch, position, partial, state), partial q of this block = channels
        # [cb·BD + q·W, cb·BD + (q+1)·W), of group (cb·BD + q·W) // DG
        P = NCH // W
        part = cb * (BD // W) + tl.arange(0, BD // W)
        part_ok = part < P
        part_grp = (part * W) // DG
        part_idx = idx_ptr + part_grp * L
        dB_base = dB_ptr + bi * L * P * N
        dC_base = dC_ptr + bi * L * P * N
        state_row = (bi * NSEG + seg) * N
        if HAS_CARRY:
            r = _states_load(gin_ptr, state_row, ch, ch_ok, N, NCH, BD, BN, VN)
        else:
            r = _states_zeros(Dv.dtype, BD, BN, VN)
        dA_acc = _states_zeros(Dv.dtype, BD, BN, VN)  # (unused by pass 1, compiled away)
        dsum = tl.zeros((BD,), dtype=Dv.dtype)
        t_begin = seg * SEG_LEN
        t_end = tl.minimum(t_begin + SEG_LEN, L)
        if not END_ONLY:
            h_cur = _states_load(h_base, (t_end - 1).to(tl.int64) * N, ch, ch_ok, N, NCH, BD, BN, VN)
        # As in the forward: positions an iteration ahead, every load of an iteration before its
        # first store.
        pos_next = _step_positions(idx_rows, t_end - 1, t_begin, t_end, ch_ok, ROUTED, UNROLL, BD, True)
        if not END_ONLY:
            ppos_next = _step_positions(part_idx, t_end - 1, t_begin, t_end, part_ok, ROUTED, UNROLL, BD // W, True)
        for k0 in range(0, t_end - t_begin, UNROLL):
            pos_now = pos_next
            if not END_ONLY:
                ppos_now = ppos_next
            loaded = ()
            for j in tl.static_range(UNROLL):
                t = t_end - 1 - (k0 + j)
                ok = ch_ok & (t >= t_begin)
                pos = pos_now[j]
                raw, dlt = _step_delta(pos, ok, dt_base, ch * sd_c, sd_l, bias, HAS_BIAS, SOFTPLUS)
                dyv = tl.load(dy_base + (uch * sy_c + pos * sy_l), mask=ok, other=0.0)
                Cv = _group_states_load(C_base, C_row + pos * sC_l, ok, N, BD, BN, VN, VEC_BC)
                if END_ONLY:
                    h_prev = Cv  # unused
                    uu = dyv
                    Bv = Cv
                else:
                    h_prev = _states_load(h_base, (t - 1).to(tl.int64) * N, ch, ok, N, NCH, BD, BN, VN, t >= 1)
                    uu = tl.load(u_base + (uch * su_c + pos * su_l), mask=ok, other=0.0)
                    Bv = _group_states_load(B_base, B_row + pos * sB_l, ok, N, BD, BN, VN, VEC_BC)
                loaded = loaded + ((pos, raw, dlt, dyv, Cv, h_prev, uu, Bv),)
            pos_next = _step_positions(idx_rows, t_end - 1 - (k0 + UNROLL), t_begin, t_end, ch_ok, ROUTED, UNROLL,
                                       BD, True)
            if not END_ONLY:
                ppos_next = _step_positions(part_idx, t_end - 1 - (k0 + UNROLL), t_begin, t_end, part_ok, ROUTED,
                                            UNROLL, BD // W, True)
            for j in tl.static_range(UNROLL):
                pos, raw, dlt, dyv, Cv, h_prev, uu, Bv = loaded[j]
                t = t_end - 1 - (k0 + j)
                ok = ch_ok & (t >= t_begin)
                g = ()
                a = ()
                for c in tl.static_range(BN // VN):
                    g = g + (r[c] + Cv[c] * dyv[None, :],)
                    a = a + (tl.exp2(dlt[None, :] * A2[c]),)
                if END_ONLY:
                    dsum += dlt
                else:
                    gB = tl.zeros((BD,), dtype=Dv.dtype)
                    gaA = tl.zeros((BD,), dtype=Dv.dtype)
                    dA_new = ()
                    t_ok = t >= t_begin
                    for c in tl.static_range(BN // VN):
                        gB += tl.sum(g[c] * Bv[c], axis=0)
                        gah = g[c] * a[c] * h_prev[c]
                        gaA += tl.sum(gah * A2[c], axis=0)
                        dA_new = dA_new + (dA_acc[c] + gah * dlt[None, :],)
                        offs = c * VN + tl.arange(0, VN)
                        poff = (ppos_now[j] * (P * N))[None, :] + part[None, :] * N + offs[:, None]
                        m_part = (offs < N)[:, None] & part_ok[None, :] & t_ok
                        tl.store(dB_base + poff, _partial_sum(g[c] * (dlt * uu)[None, :], VN, BD, W), mask=m_part)
                        tl.store(dC_base + poff, _partial_sum(h_cur[c] * dyv[None, :], VN, BD, W), mask=m_part)
                    dA_acc = dA_new
                    du = dlt * gB
                    if HAS_D:
                        du = du + Dv * dyv
                    # Σ_n g a x_{t-1} A, with A = A2 · ln 2
                    ddl = gaA * 0.6931471805599453 + gB * uu
                    if SOFTPLUS:  # softplus' derivative, with torch's threshold
                        ddl = tl.where(raw > 20.0, ddl, ddl / (1.0 + tl.exp(-raw)))
                    if ACCUM:
                        tl.atomic_add(du_base + (uch * sdu_c + pos * sdu_l), du, mask=ok)
                    else:
                        tl.store(du_base + (uch * sdu_c + pos * sdu_l), du, mask=ok)
                    tl.store(ddt_base + (ch * sdd_c + pos * sdd_l), ddl, mask=ok)
                    h_cur = h_prev
                r_new = ()
                for c in tl.static_range(BN // VN):
                    r_new = r_new + (a[c] * g[c],)
                r = r_new
        if END_ONLY:
            _segment_end_store(end_ptr, prod_ptr, state_row, ch, ch_ok, N, NCH, r, dsum, A2, BD, BN, VN)
        else:
            _states_store(dA_ptr, state_row, ch, ch_ok, N, NCH, dA_acc, BD, BN, VN)

    @triton.jit(do_not_specialize=["NSEG", "M"])
    def _segment_carry_kernel(end_ptr, prod_ptr, out_ptr, NSEG, M, BS: tl.constexpr, BM: tl.constexpr,
                              SEQ: tl.constexpr):
        """Pass 2 for segment states laid out (batch, segment, M) with M = states × channels:
        out[s] = the state entering segment s, i.e. the chain carry_{s+1} = end_s + prod_s carry_s
        from carry_0 = 0, by associative scans over BS segments at a time (the loads of a block do
        not wait on the chain). Program = (block of BM state-channel pairs, batch)."""
        mb = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        offs_m = mb * BM + tl.arange(0, BM)
        m_ok = offs_m < M
        base = bi * NSEG * M + offs_m[None, :]
        carry = tl.zeros((BM,), dtype=end_ptr.dtype.element_ty)
        s_loc = tl.arange(0, BS)
        for s0 in range(0, NSEG, BS):
            s = s0 + s_loc
            s_ok = s < NSEG
            msk = s_ok[:, None] & m_ok[None, :]
            off = base + s.to(tl.int64)[:, None] * M
            e = tl.load(end_ptr + off, mask=msk, other=0.0)
            p = tl.load(prod_ptr + off, mask=msk, other=1.0)
            if SEQ:  # the interpreter: the same chain, one segment at a time
                for k in tl.static_range(BS):
                    sel = (s_loc == k)[:, None]
                    tl.store(out_ptr + off, tl.broadcast_to(carry[None, :], (BS, BM)), mask=msk & sel)
                    carry = tl.sum(tl.where(sel, e, 0.0), axis=0) + tl.sum(tl.where(sel, p, 0.0), axis=0) * carry
            else:
                P, X = tl.associative_scan((p, e), 0, _combine)
                X = X + P * carry[None, :]  # state after segment s
                # entering s + 1 = after s; entering the block's first segment = the old carry
                tl.store(out_ptr + off + M, X, mask=msk & (s < NSEG - 1)[:, None])
                tl.store(out_ptr + off, tl.broadcast_to(carry[None, :], (BS, BM)),
                         mask=msk & (s_loc == 0)[:, None])
                carry = tl.sum(tl.where((s_loc == BS - 1)[:, None], X, 0.0), axis=0)

    @triton.jit(do_not_specialize=_RUNTIME_INTS)
    def _bwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, idx_ptr, dy_ptr,
        st_ptr, gin_ptr,
        du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr,
        L, U_CH, NCH, G, DG, N, NBLK_D, SEG_TILES, NSEG, NTILES,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        ROUTED: tl.constexpr, ACCUM: tl.constexpr, HAS_CARRY: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, SEQ: tl.constexpr,
    ):
        """Backward sweep of one segment, tiles in reverse order.

        Per tile: states before each step (h_{t-1}) from the stored tile-start state and a scan
        of the shifted steps; the adjoint g_t by a reverse scan of (a_{t+1}, C_t dy_t) carried
        in from the next tile; then all gradients of the tile.
        """
        pid = tl.program_id(0)
        seg = tl.program_id(1)
        bi64, grp, dblk, ch, ch_ok, uch, ch64, offs_n, n_ok, m_dn, A, A2, Dv, bias = _tile_setup(
            pid, A_ptr, D_ptr, bias_ptr, G, NBLK_D, DG, U_CH, N, HAS_D, HAS_BIAS, BD, BN)
        uch64 = uch.to(tl.int64)
        u_rows = u_ptr + (bi64 * U_CH + uch64) * L
        dy_rows = dy_ptr + (bi64 * U_CH + uch64) * L
        du_rows = du_ptr + (bi64 * U_CH + uch64) * L
        dt_rows = dt_ptr + (bi64 * NCH + ch64) * L
        ddt_rows = ddt_ptr + (bi64 * NCH + ch64) * L
        B_rows = B_ptr + ((bi64 * G + grp) * N + offs_n) * L
        C_rows = C_ptr + ((bi64 * G + grp) * N + offs_n) * L
        part = (bi64 * G + grp) * NBLK_D + dblk  # this block's slice of the dB/dC partial sums
        dB_rows = dB_ptr + (part * N + offs_n) * L
        dC_rows = dC_ptr + (part * N + offs_n) * L
        if HAS_CARRY:
            g = tl.load(gin_ptr + ((bi64 * NCH + ch64)[:, None] * NSEG + seg) * N + offs_n[None, :],
                        mask=m_dn, other=0.0)
        else:
            g = tl.zeros((BD, BN), dtype=A.dtype)
        dA_acc = tl.zeros((BD, BN), dtype=A.dtype)
        first_tile = seg * SEG_TILES
        n_here = tl.minimum(SEG_TILES, NTILES - first_tile)
        j = tl.arange(0, BT)
        for kk in range(0, n_here):
            tile = first_tile + n_here - 1 - kk
            t0 = tile * BT
            offs_t = t0 + j
            t_ok = offs_t < L
            m2 = ch_ok[:, None] & t_ok[None, :]
            mn2 = n_ok[:, None] & t_ok[None, :]
            pos = _positions(idx_ptr, grp, offs_t, t_ok, L, ROUTED)
            h0 = tl.load(st_ptr + ((bi64 * NCH + ch64)[:, None] * NTILES + tile) * N + offs_n[None, :],
                         mask=m_dn, other=0.0)
            # this step
            raw, dlt = _delta_tile(dt_rows, pos, m2, bias, HAS_BIAS, SOFTPLUS)
            uu = tl.load(u_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            dy = tl.load(dy_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            Bt = tl.load(B_rows[:, None] + pos[None, :], mask=mn2, other=0.0)
            Ct = tl.load(C_rows[:, None] + pos[None, :], mask=mn2, other=0.0)
            # previous step (identity at the tile's first step): h_{t-1}
            p_ok = (j >= 1) & t_ok
            pos_p = _positions(idx_ptr, grp, offs_t - 1, p_ok, L, ROUTED)
            mp = ch_ok[:, None] & p_ok[None, :]
            raw_p, dlt_p = _delta_tile(dt_rows, pos_p, mp, bias, HAS_BIAS, SOFTPLUS)
            uu_p = tl.load(u_rows[:, None] + pos_p[None, :], mask=mp, other=0.0)
            Bt_p = tl.load(B_rows[:, None] + pos_p[None, :], mask=n_ok[:, None] & p_ok[None, :], other=0.0)
            a_p = tl.exp2(dlt_p[:, None, :] * A2[:, :, None])
            b_p = (dlt_p * uu_p)[:, None, :] * Bt_p[None, :, :]
            P1, Hs = _scan(a_p, b_p, BT, False, SEQ)
            Hprev = Hs + P1 * h0[:, :, None]
            a = tl.exp2(dlt[:, None, :] * A2[:, :, None])
            aH = a * Hprev
            H = aH + (dlt * uu)[:, None, :] * Bt[None, :, :]
            # next step's decay a_{t+1} (1 past the end: g_L = 0 anyway)
            x_ok = (offs_t + 1) < L
            pos_x = _positions(idx_ptr, grp, offs_t + 1, x_ok, L, ROUTED)
            mx = ch_ok[:, None] & x_ok[None, :]
            raw_x, dlt_x = _delta_tile(dt_rows, pos_x, mx, bias, HAS_BIAS, SOFTPLUS)
            an = tl.exp2(dlt_x[:, None, :] * A2[:, :, None])
            c = Ct[None, :, :] * dy[:, None, :]
            Q, Gs = _scan(an, c, BT, True, SEQ)
            gt = Gs + Q * g[:, :, None]  # ∂loss/∂x_t
            g = _first(gt, BT)
            # gradients
            gB = tl.sum(gt * Bt[None, :, :], axis=1)  # (BD, BT)
            du = dlt * gB
            if HAS_D:
                du = du + Dv[:, None] * dy
            gaH = gt * aH
            ddl = tl.sum(gaH * A[:, :, None], axis=1) + gB * uu
            if SOFTPLUS:  # softplus' derivative, with torch's threshold
                ddl = tl.where(raw > 20.0, ddl, ddl / (1.0 + tl.exp(-raw)))
            dA_acc += tl.sum(gaH * dlt[:, None, :], axis=2)
            dB = tl.sum(gt * (dlt * uu)[:, None, :], axis=0)  # (BN, BT)
            dC = tl.sum(H * dy[:, None, :], axis=0)
            if ACCUM:
                tl.atomic_add(du_rows[:, None] + pos[None, :], du, mask=m2)
            else:
                tl.store(du_rows[:, None] + pos[None, :], du, mask=m2)
            tl.store(ddt_rows[:, None] + pos[None, :], ddl, mask=m2)
            tl.store(dB_rows[:, None] + pos[None, :], dB, mask=mn2)
            tl.store(dC_rows[:, None] + pos[None, :], dC, mask=mn2)
        dA_off = ((bi64 * NSEG + seg) * NCH + ch64)[:, None] * N + offs_n[None, :]
        tl.store(dA_ptr + dA_off, dA_acc, mask=m_dn)


# --- launch configuration -------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _config(b: int, G: int, DG: int, L: int, N: int, device: torch.device, backward: bool,
            block_d: int | None = None, block_t: int | None = None, seg_tiles: int | None = None) -> dict:
    """Block sizes and segmentation for one call (overrides are for tests and sweeps)."""
    BN = _next_pow2(N)
    BD = block_d or min(_next_pow2(DG), MAX_BLOCK_D)
    budget = BWD_TILE_ELEMENTS if backward else FWD_TILE_ELEMENTS
    BT = block_t or max(16, min(256, _next_pow2(max(1, budget // (BD * BN))), _next_pow2(L)))
    if INTERPRET and block_t is None:
        BT = min(BT, 16)  # the interpreter's cost grows with the tile's step loop
    nblk_d = -(-DG // BD)
    ntiles = -(-L // BT)
    if seg_tiles is None:
        programs = b * G * nblk_d
        want = max(1, -(-PROGRAMS_PER_SM * _sm_count(device) // programs))
        want = min(want, MAX_SEGMENTS, ntiles)
        seg_tiles = -(-ntiles // want)
    seg_tiles = max(1, min(int(seg_tiles), ntiles))
    nseg = -(-ntiles // seg_tiles)
    return dict(BD=BD, BN=BN, BT=BT, NBLK_D=nblk_d, NTILES=ntiles, SEG_TILES=seg_tiles, NSEG=nseg)


def _grid0(b, G, cfg):
    return b * G * cfg["NBLK_D"]


# --- launchers ------------------------------------------------------------------------------

def _step_segments(b: int, NCH: int, L: int, device, seg_len: int | None = None, block_d: int | None = None):
    """(steps per segment, segments) of the step kernel: enough warps to fill the GPU."""
    BD = block_d or 32 * STEP_WARPS
    if seg_len is None:
        warps = b * -(-NCH // BD) * max(1, BD // 32)
        want = max(1, -(-STEP_WARPS_PER_SM * _sm_count(device) // warps))
        want = min(want, STEP_MAX_SEGMENTS, max(1, L // STEP_MIN_SEGMENT))
        seg_len = -(-L // want)
    seg_len = max(1, int(seg_len))
    return seg_len, -(-L // seg_len)


def seq_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A (b, c, L) tensor stored as (b, L, c): the layout the step kernels read coalesced."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def bc_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A (b, g, n, L) B/C tensor stored as (b, L, g, n): unit stride along the states."""
    return t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)


def _vector_states(B: torch.Tensor, C: torch.Tensor, N: int) -> bool:
    """Whether the step kernels may read B and C four states at a time (16-byte loads): float32,
    N a power of two ≥ 4 (no state mask), and every (batch, group, position) row 16-byte aligned."""
    if N < 4 or N & (N - 1):
        return False
    for t in (B, C):
        if t.dtype != torch.float32 or t.data_ptr() % 16 or any(st % 4 for st in (t.stride(0), t.stride(1), t.stride(3))):
            return False
    return True


def _step_setup(u, delta, A, B, C, D, delta_bias, softplus, idx, seg_len, block_d, extra=()):
    """What the step kernels' launches share: B/C in (b, L, g, n) memory, the size checks, the
    run-time sizes and strides, the flags, the grid and the placeholder pointers."""
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    BD = block_d or 32 * STEP_WARPS
    seg_len, nseg = _step_segments(b, NCH, L, u.device, seg_len, BD)
    if B.stride(2) != 1 or C.stride(2) != 1:  # the kernels want (b, L, g, n) in memory
        B, C = bc_channels_last(B), bc_channels_last(C)
    for t in (u, delta, B, C, *extra):
        if max((s - 1) * st for s, st in zip(t.shape[1:], t.stride()[1:])) >= 2 ** 31:
            raise ValueError(f"selective scan (step kernel): one batch item of a {tuple(t.shape)} tensor "
                             f"spans 2^31 elements or more")
    if b * nseg * N * NCH >= 2 ** 31:
        raise ValueError("selective scan (step kernel): too many segment states for 32-bit offsets")
    strides = dict(zip(("su_b", "su_c", "su_l"), u.stride())) | dict(zip(("sd_b", "sd_c", "sd_l"), delta.stride()))
    strides |= dict(zip(("sB_b", "sB_g", "sB_l"), B.stride()[:2] + B.stride()[3:]))
    strides |= dict(zip(("sC_b", "sC_g", "sC_l"), C.stride()[:2] + C.stride()[3:]))
    sizes = dict(L=L, U_CH=U_CH, NCH=NCH, DG=NCH // G, N=N, NSEG=nseg, SEG_LEN=seg_len)
    BN = _next_pow2(N)
    flags = dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
                 ROUTED=idx is not None, BD=BD, BN=BN, VN=min(4, BN), VEC_BC=_vector_states(B, C, N))
    warps = max(1, min(BD // 32, 8)) if BD >= 32 else 1
    launch = dict(num_warps=warps) | ({"maxnreg": STEP_MAXNREG} if STEP_MAXNREG and not INTERPRET else {})
    ptrs = (D if D is not None else A, delta_bias if delta_bias is not None else A, idx if idx is not None else u)
    return B, C, sizes, strides, flags, launch, (-(-NCH // BD), nseg, b), ptrs


def _step_segment_starts(u, delta, A, B, C, ptrs, sizes, strides, flags, launch, grid):
    """Passes 1-2 of the step forward: the state entering every segment, (b, nseg, N, NCH)."""
    Dp, bp, ip = ptrs
    b, nseg, N, NCH = u.shape[0], sizes["NSEG"], sizes["N"], sizes["NCH"]
    end = torch.empty(b, nseg, N, NCH, device=u.device, dtype=u.dtype)
    prod = torch.empty_like(end)
    _fwd_step_kernel[grid](u, delta, A, B, C, Dp, bp, ip, u, u, end, prod, u, **sizes, **strides, **flags,
                           sy_b=0, sy_c=0, sy_l=0, ACCUM=False, HAS_CARRY=False, END_ONLY=True,
                           UNROLL=STEP_UNROLL, **launch)
    return _chain_segments(end, prod)


def _chain_segments(end, prod, reverse=False):
    """out[:, s] = carry entering segment s of the chain carry' = end_s + prod_s · carry (from a
    zero carry; from the last segment backwards when ``reverse``). (b, nseg, ...) tensors."""
    if reverse:
        return _chain_segments(end.flip(1), prod.flip(1)).flip(1)
    b, nseg = end.shape[:2]
    end, prod = end.reshape(b, nseg, -1).contiguous(), prod.reshape(b, nseg, -1).contiguous()
    M = end.shape[-1]
    out = torch.empty_like(end)
    BS = 8 if INTERPRET else CARRY_BLOCK_S
    BM = min(CARRY_BLOCK_M, _next_pow2(M))
    _segment_carry_kernel[(-(-M // BM), b)](end, prod, out, nseg, M, BS=BS, BM=BM, SEQ=INTERPRET,
                                            num_warps=CARRY_WARPS)
    return out


def _forward_step(u, delta, A, B, C, D, delta_bias, softplus, idx=None, accumulate=False, seg_len=None,
                  block_d=None, out=None):
    """``_forward`` with the step kernel. Every tensor may have any strides (channels-last views
    read and write coalesced); ``out`` (b, U_CH, L), any strides, receives y when given."""
    b, U_CH, L = u.shape
    if out is None:
        y = (torch.zeros if accumulate else torch.empty)(b, U_CH, L, device=u.device, dtype=u.dtype)
    else:
        y = out.zero_() if accumulate else out
    if L == 0:
        return y
    B, C, sizes, strides, flags, launch, grid, ptrs = _step_setup(u, delta, A, B, C, D, delta_bias, softplus, idx,
                                                                  seg_len, block_d, extra=(y,))
    hin = u
    if sizes["NSEG"] > 1:
        hin = _step_segment_starts(u, delta, A, B, C, ptrs, sizes, strides, flags, launch, grid)
    _fwd_step_kernel[grid](u, delta, A, B, C, *ptrs, y, hin, u, u, u, **sizes, **strides, **flags,
                           **dict(zip(("sy_b", "sy_c", "sy_l"), y.stride())), ACCUM=bool(accumulate),
                           HAS_CARRY=sizes["NSEG"] > 1, END_ONLY=False, UNROLL=STEP_UNROLL, **launch)
    return y


def _step_partial_width(DG: int, BD: int) -> int | None:
    """Channels per partial dB/dC sum in the step backward: a whole block when the block lies
    inside one group, one group when a block holds several whole groups (None: neither)."""
    if DG % BD == 0:
        return BD
    if BD % DG == 0:
        return DG
    return None


def _channels_last_like(t: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """A new (b, c, L) tensor stored as (b, L, c)."""
    b, c, L = t.shape
    return (torch.zeros if zero else torch.empty)(b, L, c, device=t.device, dtype=t.dtype).transpose(1, 2)


def _backward_step(u, delta, A, B, C, D, delta_bias, softplus, dy, idx=None, accumulate=False, seg_len=None,
                   block_d=None):
    """``_backward`` with the step kernels (any input strides; routed through ``idx``).

    The forward states are recomputed (passes 1-3 of the step forward) and stored for every
    step; the adjoint runs backwards in time over the same segments, chained by the same carry
    kernel run from the right. du and ddelta come back stored channels-last ((b, L, c) memory),
    dB and dC as (b, L, g, n) memory viewed (b, g, n, L).
    """
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    if L == 0:
        raise ValueError("selective scan backward needs L >= 1")
    B, C, sizes, strides, flags, launch, grid, ptrs = _step_setup(u, delta, A, B, C, D, delta_bias, softplus, idx,
                                                                  seg_len, block_d, extra=(dy,))
    BD, nseg = flags["BD"], sizes["NSEG"]
    W = _step_partial_width(NCH // G, BD)
    if W is None:
        raise ValueError(f"step backward: {NCH // G} channels per group fit neither inside nor around "
                         f"blocks of {BD} channels")
    P = NCH // W
    if L * P * N >= 2 ** 31:
        raise ValueError("selective scan (step backward): too many positions for its offsets")
    dev, dt_ = u.device, u.dtype
    hin = u
    if nseg > 1:
        hin = _step_segment_starts(u, delta, A, B, C, ptrs, sizes, strides, flags, launch, grid)
    states = torch.empty(b, L, N, NCH, device=dev, dtype=dt_)  # the state after every step
    _fwd_step_kernel[grid](u, delta, A, B, C, *ptrs, u, hin, u, u, states, **sizes, **strides, **flags,
                           sy_b=0, sy_c=0, sy_l=0, ACCUM=False, HAS_CARRY=nseg > 1, END_ONLY=False,
                           WRITE_Y=False, STORE_H=True, UNROLL=STEP_UNROLL, **launch)
    du = _channels_last_like(u, zero=bool(accumulate))
    ddelta = _channels_last_like(delta)
    dB_part = torch.empty(b, L, P, N, device=dev, dtype=dt_)
    dC_part = torch.empty_like(dB_part)
    dA_part = torch.empty(b, nseg, N, NCH, device=dev, dtype=dt_)
    args = (u, delta, A, B, C, *ptrs, dy, states)
    bwd = dict(**sizes, **strides, **dict(zip(("sy_b", "sy_c", "sy_l"), dy.stride())),
               **dict(zip(("sdu_b", "sdu_c", "sdu_l"), du.stride())),
               **dict(zip(("sdd_b", "sdd_c", "sdd_l"), ddelta.stride())),
               **flags, W=W, UNROLL=STEP_BWD_UNROLL, **launch)
    gin = u
    if nseg > 1:
        gend = torch.empty(b, nseg, N, NCH, device=dev, dtype=dt_)
        gprod = torch.empty_like(gend)
        _bwd_step_kernel[grid](*args, u, u, u, u, u, u, gend, gprod, ACCUM=False, HAS_CARRY=False,
                               END_ONLY=True, **bwd)
        gin = _chain_segments(gend, gprod, reverse=True)
    _bwd_step_kernel[grid](*args, gin, du, ddelta, dA_part, dB_part, dC_part, u, u, ACCUM=bool(accumulate),
                           HAS_CARRY=nseg > 1, END_ONLY=False, **bwd)
    dA = dA_part.sum((0, 1)).t().contiguous()
    if P > G:
        dB_part = dB_part.view(b, L, G, P // G, N).sum(3)
        dC_part = dC_part.view(b, L, G, P // G, N).sum(3)
    dB = dB_part.permute(0, 2, 3, 1)
    dC = dC_part.permute(0, 2, 3, 1)
    dD = None
    if D is not None:
        dD = (dy * u).sum((0, 2))
        if U_CH != NCH:
            dD = dD.repeat(NCH // U_CH)
    ddelta_bias = ddelta.sum((0, 2)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, ddelta_bias


def step_backward_supported(NCH: int, G: int, block_d: int | None = None) -> bool:
    return _step_partial_width(NCH // G, block_d or 32 * STEP_WARPS) is not None


def _use_step_backward(A: torch.Tensor, B: torch.Tensor) -> bool:
    """The step backward is selected (``BACKWARD_KERNEL``) and its channel blocks fit A's groups."""
    return BACKWARD_KERNEL == "step" and step_backward_supported(A.shape[0], B.shape[1])


def _forward(u, delta, A, B, C, D, delta_bias, softplus, idx=None, accumulate=False, **overrides):
    """y (b, U_CH, L): u (b, U_CH, L), delta (b, NCH, L), A (NCH, N), B/C (b, G, N, L).

    Scan channel c belongs to group c // (NCH / G) and reads u channel c % U_CH; with ``idx``
    (G, L) int32, its step t is position idx[group, t]. ``accumulate`` adds the outputs of
    scan channels that share a u channel (the add merge).
    """
    global FORWARD_KERNEL
    if FORWARD_KERNEL == "step" and not overrides:
        try:
            return _forward_step(u, delta, A, B, C, D, delta_bias, softplus, idx, accumulate)
        except Exception as e:  # a compiler that rejects the step kernel: keep the tile kernel
            if INTERPRET:
                raise
            import warnings

            warnings.warn(f"triton step-sequential scan failed ({type(e).__name__}: {e}); using the tile kernel")
            FORWARD_KERNEL = "tile"
    return _forward_tile(u, delta, A, B, C, D, delta_bias, softplus, idx, accumulate, **overrides)


def _forward_tile(u, delta, A, B, C, D, delta_bias, softplus, idx=None, accumulate=False, **overrides):
    """``_forward`` with the tile kernel (associative scans over tiles of steps)."""
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    DG = NCH // G
    cfg = _config(b, G, DG, L, N, u.device, False, **overrides)
    y = (torch.zeros if accumulate else torch.empty)(b, U_CH, L, device=u.device, dtype=u.dtype)
    if L == 0:
        return y
    grid0 = _grid0(b, G, cfg)
    common = dict(L=L, U_CH=U_CH, NCH=NCH, G=G, DG=DG, N=N, NBLK_D=cfg["NBLK_D"],
                  SEG_TILES=cfg["SEG_TILES"], NSEG=cfg["NSEG"], NTILES=cfg["NTILES"])
    blocks = dict(BD=cfg["BD"], BN=cfg["BN"], BT=cfg["BT"], SEQ=INTERPRET and not ASSOC_SCAN_IN_INTERPRETER)
    flags = dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
                 ROUTED=idx is not None)
    Dp = D if D is not None else A
    bp = delta_bias if delta_bias is not None else A
    ip = idx if idx is not None else u
    hin = u  # placeholder pointer when unused
    if cfg["NSEG"] > 1:
        shape = (b, NCH, cfg["NSEG"], N)
        end = torch.empty(shape, device=u.device, dtype=u.dtype)
        prod = torch.empty_like(end)
        _fwd_kernel[(grid0, cfg["NSEG"])](
            u, delta, A, B, C, Dp, bp, ip, y, u, end, prod, u, **common, **flags,
            ACCUM=False, HAS_CARRY=False, END_ONLY=True, STORE_STATES=False, WRITE_Y=False,
            **blocks, num_warps=FWD_WARPS)
        hin = torch.empty_like(end)
        _carry_kernel[(grid0,)](end, prod, hin, NCH, G, DG, N, cfg["NBLK_D"], cfg["NSEG"], U_CH,
                                REVERSE=False, BD=cfg["BD"], BN=cfg["BN"], num_warps=1)
    _fwd_kernel[(grid0, cfg["NSEG"])](
        u, delta, A, B, C, Dp, bp, ip, y, hin, u, u, u, **common, **flags,
        ACCUM=bool(accumulate), HAS_CARRY=cfg["NSEG"] > 1, END_ONLY=False, STORE_STATES=False,
        WRITE_Y=True, **blocks, num_warps=FWD_WARPS)
    return y


def _backward(u, delta, A, B, C, D, delta_bias, softplus, dy, idx=None, accumulate=False, **overrides):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias) for ``_forward``'s layout and options: the step
    kernels (``BACKWARD_KERNEL``) where their channel blocks fit the groups, else the tile kernels
    (also when ``overrides`` pick tile sizes)."""
    if not overrides and _use_step_backward(A, B):
        return _backward_step(u, delta, A, B, C, D, delta_bias, softplus, dy, idx, accumulate)
    return _backward_tile(u, delta, A, B, C, D, delta_bias, softplus, dy, idx, accumulate, **overrides)


def _backward_tile(u, delta, A, B, C, D, delta_bias, softplus, dy, idx=None, accumulate=False, **overrides):
    """``_backward`` with the tile kernels (inputs contiguous)."""
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    DG = NCH // G
    cfg = _config(b, G, DG, L, N, u.device, True, **overrides)
    dev, dt_ = u.device, u.dtype
    grid0 = _grid0(b, G, cfg)
    NSEG, NBLK_D = cfg["NSEG"], cfg["NBLK_D"]
    common = dict(L=L, U_CH=U_CH, NCH=NCH, G=G, DG=DG, N=N, NBLK_D=NBLK_D,
                  SEG_TILES=cfg["SEG_TILES"], NSEG=NSEG, NTILES=cfg["NTILES"])
    blocks = dict(BD=cfg["BD"], BN=cfg["BN"], BT=cfg["BT"], SEQ=INTERPRET and not ASSOC_SCAN_IN_INTERPRETER)
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), ROUTED=idx is not None)
    Dp = D if D is not None else A
    bp = delta_bias if delta_bias is not None else A
    ip = idx if idx is not None else u
    du = (torch.zeros if accumulate else torch.empty)(b, U_CH, L, device=dev, dtype=dt_)
    ddelta = torch.empty(b, NCH, L, device=dev, dtype=dt_)
    if NBLK_D == 1:
        dB = torch.empty(b, G, N, L, device=dev, dtype=dt_)
        dC = torch.empty_like(dB)
    else:
        dB = torch.empty(b, G, NBLK_D, N, L, device=dev, dtype=dt_)
        dC = torch.empty_like(dB)
    dA_part = torch.empty(b, NSEG, NCH, N, device=dev, dtype=dt_)
    if L == 0:
        raise ValueError("selective scan backward needs L >= 1")
    hin, gin = u, u
    if NSEG > 1:
        shape = (b, NCH, NSEG, N)
        end = torch.empty(shape, device=dev, dtype=dt_)
        prod = torch.empty_like(end)
        _fwd_kernel[(grid0, NSEG)](
            u, delta, A, B, C, Dp, bp, ip, u, u, end, prod, u, **common, **flags, HAS_D=False,
            ACCUM=False, HAS_CARRY=False, END_ONLY=True, STORE_STATES=False, WRITE_Y=False,
            **blocks, num_warps=FWD_WARPS)
        gend = torch.empty_like(end)
        gprod = torch.empty_like(end)
        _bwd_seg_kernel[(grid0, NSEG)](
            delta, A, C, bp, ip, dy, gend, gprod, **common, **flags, **blocks, num_warps=BWD_WARPS)
        hin = torch.empty_like(end)
        gin = torch.empty_like(end)
        _carry_kernel[(grid0,)](end, prod, hin, NCH, G, DG, N, NBLK_D, NSEG, U_CH,
                                REVERSE=False, BD=cfg["BD"], BN=cfg["BN"], num_warps=1)
        _carry_kernel[(grid0,)](gend, gprod, gin, NCH, G, DG, N, NBLK_D, NSEG, U_CH,
                                REVERSE=True, BD=cfg["BD"], BN=cfg["BN"], num_warps=1)
    states = torch.empty(b, NCH, cfg["NTILES"], N, device=dev, dtype=dt_)
    _fwd_kernel[(grid0, NSEG)](
        u, delta, A, B, C, Dp, bp, ip, u, hin, u, u, states, **common, **flags, HAS_D=False,
        ACCUM=False, HAS_CARRY=NSEG > 1, END_ONLY=False, STORE_STATES=True, WRITE_Y=False,
        **blocks, num_warps=FWD_WARPS)
    _bwd_kernel[(grid0, NSEG)](
        u, delta, A, B, C, Dp, bp, ip, dy, states, gin, du, ddelta, dA_part, dB, dC,
        **common, **flags, HAS_D=D is not None, ACCUM=bool(accumulate), HAS_CARRY=NSEG > 1,
        **blocks, num_warps=BWD_WARPS)
    dA = dA_part.sum((0, 1))
    if NBLK_D > 1:
        dB = dB.sum(2)
        dC = dC.sum(2)
    dD = None
    if D is not None:
        dD = (dy * u).sum((0, 2))
        if U_CH != NCH:
            dD = dD.repeat(NCH // U_CH)
    ddelta_bias = ddelta.sum((0, 2)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, ddelta_bias


# --- the selective_scan backend ---------------------------------------------------------------

def forward(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """Backend forward: y of the selective scan (no z gate), u (b, d, L), B/C (b, g, n, L)."""
    return _forward(u, delta, A, B, C, D, delta_bias, delta_softplus)


def backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy):
    """Backend backward: (du, ddelta, dA, dB, dC, dD, ddelta_bias)."""
    return _backward(u, delta, A, B, C, D, delta_bias, delta_softplus, dy.contiguous())


def is_available() -> bool:
    return triton is not None and (INTERPRET or torch.cuda.is_available())


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


register_backend(ScanBackend("triton", forward, backward, is_available, supports))


# --- fused multi-route scan -----------------------------------------------------------------

_ROUTE_IDX: dict[tuple, torch.Tensor] = {}


def route_index(head_routes: tuple[str, ...], height: int, width: int, device) -> torch.Tensor:
    """(K, H·W) int32: step t of head k reads/writes flat position [k, t]; cached."""
    from harness.models.routes import route_indices

    device = torch.device(device)
    key = (tuple(head_routes), height, width, device)
    hit = _ROUTE_IDX.get(key)
    if hit is None:
        perm, _ = route_indices(tuple(head_routes), height, width, device)
        hit = perm.to(torch.int32).contiguous()
        if len(_ROUTE_IDX) > 256:
            _ROUTE_IDX.clear()
        _ROUTE_IDX[key] = hit
    return hit


Tensor = torch.Tensor


def _route_scan_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                     routes: str, height: int, width: int, accumulate: bool) -> Tensor:
    """y of the routed scan, returned channels-last: (b, L, U_CH). Inputs may have any strides."""
    idx = route_index(tuple(routes.split(",")), height, width, u.device)
    b, U, L = u.shape
    if FORWARD_KERNEL == "step":
        out = torch.empty(b, L, U, device=u.device, dtype=u.dtype)
        _forward_step(u, delta, A, B, C, D, delta_bias, True, idx=idx, accumulate=accumulate, out=out.transpose(1, 2))
        return out
    y = _forward_tile(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), D, delta_bias, True,
                      idx=idx, accumulate=accumulate)
    return y.transpose(1, 2).contiguous()


# With the tile backward kernels (BACKWARD_KERNEL = "tile", or groups that do not fit the step
# kernel's channel blocks): reading through a route index they fetch one 32-byte sector per step
# and channel, which measured about 2x slower than the same kernels on route-ordered copies
# (b8 d64 128²: 7.1 against 3.9 ms). That backward therefore gathers its inputs into route
# order, runs unrouted, and scatters the gradients back, unless ROUTED_BACKWARD.
ROUTED_BACKWARD = False


def _route_scan_bwd_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                         dy: Tensor, routes: str, height: int, width: int, accumulate: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``_route_scan_impl`` (dy is (b, L, U_CH))."""
    idx = route_index(tuple(routes.split(",")), height, width, u.device)
    dy = dy.transpose(1, 2)  # (b, U_CH, L)
    if _use_step_backward(A, B):
        # reads and writes through the route index on channels-last runs, like the forward
        return _backward_step(u, delta, A, B, C, D, delta_bias, True, dy, idx=idx, accumulate=accumulate)
    return _step_layout(*_route_scan_bwd_tile(u, delta, A, B, C, D, delta_bias, dy, idx, accumulate))


def _step_layout(du, ddelta, dA, dB, dC, dD, dbias):
    """The gradients in the memory layout the step backward returns (and the fake declares):
    du, ddelta as (b, L, c) memory; dB, dC as (b, L, g, n) memory."""
    return (seq_channels_last(du), seq_channels_last(ddelta), dA, bc_channels_last(dB), bc_channels_last(dC), dD,
            dbias)


def _route_scan_bwd_tile(u, delta, A, B, C, D, delta_bias, dy, idx, accumulate):
    """The fused scan's gradients with the tile backward kernels."""
    if ROUTED_BACKWARD:
        return _backward_tile(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), D, delta_bias,
                              True, dy.contiguous(), idx=idx, accumulate=accumulate)
    b, U, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    steps = idx.long()  # (G, L): step t of group g is position steps[g, t]
    chan_steps = steps.repeat_interleave(NCH // G, dim=0)  # (NCH, L), per scan channel
    src = torch.arange(NCH, device=u.device) % U  # u / y channel read by each scan channel

    def to_route(t):  # (b, U, L) raster -> (b, NCH, L) in each scan channel's route order
        return t[:, src].gather(-1, chan_steps.expand(b, NCH, L))

    def bc_to_route(t):  # (b, G, N, L)
        return t.gather(-1, steps[None, :, None, :].expand(b, G, N, L))

    du_r, ddelta_r, dA, dB_r, dC_r, dD, dbias = _backward_tile(
        to_route(u), delta.gather(-1, chan_steps.expand(b, NCH, L)), A, bc_to_route(B), bc_to_route(C), D,
        delta_bias, True, to_route(dy))
    du = torch.zeros(b, U, L, device=u.device, dtype=du_r.dtype)
    # scatter back to raster order; with the add merge the K heads' gradients sum into one u channel
    du.index_add_(1, src, torch.empty_like(du_r).scatter_(-1, chan_steps.expand(b, NCH, L), du_r))
    ddelta = torch.empty_like(ddelta_r).scatter_(-1, chan_steps.expand(b, NCH, L), ddelta_r)
    order = steps[None, :, None, :].expand(b, G, N, L)
    dB = torch.empty_like(dB_r).scatter_(-1, order, dB_r)
    dC = torch.empty_like(dC_r).scatter_(-1, order, dC_r)
    return du, ddelta, dA, dB, dC, dD, dbias


# A custom operator (opaque to torch.compile, so a compiled model keeps the kernels and takes no
# graph break; the route index is looked up inside, from the route names and the grid size).
_route_scan = torch.library.custom_op("eabench::route_scan", mutates_args=())(_route_scan_impl)
_route_scan_bwd = torch.library.custom_op("eabench::route_scan_bwd", mutates_args=())(_route_scan_bwd_impl)


@_route_scan.register_fake
def _(u, delta, A, B, C, D, delta_bias, routes, height, width, accumulate):
    return u.new_empty((u.shape[0], u.shape[2], u.shape[1]))


@_route_scan_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, dy, routes, height, width, accumulate):
    b, U, L = u.shape
    G, N = B.shape[1:3]
    return (u.new_empty((b, L, U)).transpose(1, 2), delta.new_empty((b, L, delta.shape[1])).transpose(1, 2),
            A.new_empty(A.shape), B.new_empty((b, L, G, N)).permute(0, 2, 3, 1),
            C.new_empty((b, L, G, N)).permute(0, 2, 3, 1), D.new_empty(D.shape), delta_bias.new_empty(delta_bias.shape))


def _route_scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, routes, height, width, accumulate = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.route = (routes, height, width, accumulate)


def _route_scan_backward(ctx, dy):
    grads = _route_scan_bwd(*ctx.saved_tensors, dy, *ctx.route)
    return (*grads, None, None, None, None)


_route_scan.register_autograd(_route_scan_backward, setup_context=_route_scan_setup)


# x_proj weight -> (its version, dt weight (weak), its version, merge, w_x, w_dt). Keyed by the
# tensor's identity (an entry dies with its tensor), so a new tensor that reuses a freed one's
# memory can never hit a stale entry.
_WEIGHT_CACHE = WeakIdKeyDictionary()


def _projection_weights(x_proj_weight, dt_projs_weight, merge: str, R: int, N: int):
    """The per-head projections as two dense matrices for channels-last activations.

    w_x (channels in, K·(R + 2N)): head k's W_k^T on its own input channels (concat: a
    block-diagonal matrix; add: every head reads all channels), columns grouped by part so
    that every head's Δ input comes first, then every B, then every C. w_dt (K·R, K·d): the
    block-diagonal dt projection. Without gradients (inference), cached until either weight
    changes in place.
    """
    versions = None
    needs_grad = torch.is_grad_enabled() and (x_proj_weight.requires_grad or dt_projs_weight.requires_grad)
    if not needs_grad and not torch.compiler.is_compiling():  # (a compiled graph builds them once anyway)
        try:
            versions = (x_proj_weight._version, dt_projs_weight._version)
        except RuntimeError:  # inference-mode tensors keep no version counter
            versions = None
        hit = _WEIGHT_CACHE.get(x_proj_weight) if versions is not None else None
        if hit is not None:
            x_version, dt_ref, dt_version, hit_merge, w_x, w_dt = hit
            if dt_ref() is dt_projs_weight and (x_version, dt_version, hit_merge) == (*versions, merge):
                return w_x, w_dt
    K, c, d = x_proj_weight.shape
    heads = torch.arange(K, device=x_proj_weight.device)
    if merge == "concat":
        per_head = x_proj_weight.new_zeros(K, d, K, c)  # [k, :, k, :] = W_k^T, zero elsewhere
        per_head[heads, :, heads, :] = x_proj_weight.transpose(1, 2)
        per_head = per_head.reshape(K * d, K, c)
    else:
        per_head = x_proj_weight.permute(2, 0, 1)  # (D, K, c)
    w_x = torch.cat([per_head[..., :R].flatten(1), per_head[..., R:R + N].flatten(1),
                     per_head[..., R + N:].flatten(1)], dim=1)
    Kd = dt_projs_weight.shape[1]
    w_dt = dt_projs_weight.new_zeros(K, R, K, Kd)  # [k, :, k, :] = dt_k^T
    w_dt[heads, :, heads, :] = dt_projs_weight.transpose(1, 2)
    w_dt = w_dt.view(K * R, K * Kd)
    if versions is not None:
        _WEIGHT_CACHE[x_proj_weight] = (versions[0], weakref.ref(dt_projs_weight), versions[1], merge, w_x, w_dt)
    return w_x, w_dt


def fused_multi_route_scan(
    x: torch.Tensor,
    head_routes: tuple[str, ...],
    merge: str,
    x_proj_weight: torch.Tensor,
    dt_projs_weight: torch.Tensor,
    dt_projs_bias: torch.Tensor,
    A_logs: torch.Tensor,
    Ds: torch.Tensor,
) -> torch.Tensor:
    """``harness.models.eamamba.multi_route_scan`` with the routes fused into the scan kernels.

    Everything stays channels-last ((B, L, channels) in memory; x is read without a copy when it
    is a channels_last map): the per-head projections are two dense matrix products with
    block-diagonal weights (one GEMM each instead of K small ones and their transposes; they
    act position by position, so they commute with the permutations), and the scan reads x, Δ,
    B, C and writes y through each head's route index. Returns (B, D, H·W) in x's dtype, a
    transposed view of channels-last memory, differentiable in every input.
    """
    b, D, h, w = x.shape
    L = h * w
    K, c, d = x_proj_weight.shape
    R = dt_projs_weight.shape[-1]
    N = A_logs.shape[-1]
    if merge not in ("concat", "add"):
        raise ValueError(f"unknown merge {merge!r}; valid merges: ['concat', 'add']")
    if len(head_routes) != K:
        raise ValueError(f"{len(head_routes)} head routes for {K} heads")
    if any("," in r for r in head_routes):
        raise ValueError(f"route names cannot contain ',': {head_routes}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_cl = x.permute(0, 2, 3, 1).reshape(b, L, D)  # (B, L, D)
    w_x, w_dt = _projection_weights(x_proj_weight, dt_projs_weight, merge, R, N)
    x_dbl = x_cl @ w_x  # (B, L, K·R + K·N + K·N): all heads' Δ inputs, then all B, then all C
    # one split (its backward is one concatenation, where three slices would each fill a
    # zero (B, L, ·) gradient and add them up)
    dt_in, B_flat, C_flat = torch.split(x_dbl, [K * R, K * N, K * N], dim=-1)
    dts = dt_in @ w_dt  # (B, L, K·d); a strided operand, no copy
    Bs = B_flat.view(b, L, K, N).permute(0, 2, 3, 1)  # (B, K, N, L), unit stride along N
    Cs = C_flat.view(b, L, K, N).permute(0, 2, 3, 1)
    y = _route_scan(
        x_cl.transpose(1, 2).to(work), dts.transpose(1, 2).to(work), (-torch.exp(A_logs.to(work))).contiguous(),
        Bs.to(work), Cs.to(work), Ds.to(work).contiguous(), dt_projs_bias.reshape(-1).to(work).contiguous(),
        ",".join(head_routes), h, w, merge == "add",
    )  # (B, L, D)
    return y.to(x.dtype).transpose(1, 2)


# Largest map (H·W positions) whose routes are fused when the forward kernel is "tile": its routed
# reads cost one 32-byte sector per step and channel, and from 512² materialising the permuted
# copies measured faster on an H200. The step kernel reads channels-last runs (one sector per
# step and route group) and fuses every size (1024²: 379 ms per EAMamba forward against 603 ms).
FUSE_MAX_POSITIONS = 1 << 17


def can_fuse(x: torch.Tensor, backend: str = "auto") -> bool:
    """True when ``multi_route_scan(x, ..., backend)`` should call ``fused_multi_route_scan``:
    the scan resolves to the triton backend (and, with the tile kernel, the map has at most
    FUSE_MAX_POSITIONS)."""
    from harness.ops.selective_scan import resolve_backend

    if x.dim() != 4 or (FORWARD_KERNEL != "step" and x.shape[-1] * x.shape[-2] > FUSE_MAX_POSITIONS):
        return False
    try:
        return resolve_backend(backend, x.device) == "triton"
    except (ValueError, RuntimeError):
        return False
