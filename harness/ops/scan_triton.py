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

The backward pass runs the adjoint g_t = a_{t+1} g_{t+1} + C_t dy_t backwards in time with the
same segment scheme (reverse associative scans), recomputes the forward states of each tile
from stored tile-start states, and forms every gradient in one sweep: du, dΔ (through the
softplus and the bias), dA, dB, dC (per channel block, summed afterwards), dD.

Route fusion: with ``idx`` (one permutation of the H·W positions per B/C group, int32), step t
of group k reads and writes position ``idx[k, t]`` of raster-ordered tensors, so the permuted
copies of the multi-route scan and their inverses are never materialised. For the ``add`` merge
the K routes' outputs (and input gradients) are accumulated with atomic adds.

A second forward kernel (``FORWARD_KERNEL = "step"``) walks the steps one at a time with the
state in registers, as mamba_ssm does; on an H200 it measured slower than the tiles (see the
constant), so it is kept as an option, tested, and off by default.

The projections in ``fused_multi_route_scan`` compute their weight gradients as partial
products over chunks of the sequence (``_HeadProjection``): as one matrix product (einsum's
backward) the reduction over B·L ran on a handful of blocks, 119 ms of a 8×128² training step.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the same kernels on CPU tensors,
which is how the tests check their logic without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

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
# Forward pass: "tile" (associative scans over tiles of steps, as the backward pass) or "step"
# (one step per loop iteration, state in registers, as mamba_ssm). Measured on an H200 (Triton
# 3.6), batch 1, d 64, 256²: tile 0.62 ms, step 0.95 ms (routed: 0.96 vs 2.58 ms); the step
# kernel is latency-bound at these occupancies, so tiles are the default.
FORWARD_KERNEL = "tile"
SEQ_BLOCK_D = 8
SEQ_WARPS = 1
SEQ_UNROLL = 4
SEQ_PROGRAMS_PER_SM = 8
SEQ_MAX_SEGMENTS = 128
SEQ_MIN_SEGMENT = 64
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
        bi, grp, dblk, ch, ch_ok, uch = _program_coords(pid, G, NBLK_D, DG, U_CH, BD)
        offs_n = tl.arange(0, BN)
        n_ok = offs_n < N
        m_dn = ch_ok[:, None] & n_ok[None, :]
        ch64 = ch.to(tl.int64)
        A = tl.load(A_ptr + ch64[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
        A2 = A * 1.4426950408889634  # exp(Δ A) = exp2(Δ A log2 e)
        if HAS_D:
            Dv = tl.load(D_ptr + ch, mask=ch_ok, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
        bi64 = bi.to(tl.int64)
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
            raw = tl.load(dt_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            if HAS_BIAS:
                raw = raw + bias[:, None]
            dlt = tl.where(m2, _delta_of(raw, SOFTPLUS), 0.0)
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
        bi, grp, dblk, ch, ch_ok, uch = _program_coords(pid, G, NBLK_D, DG, U_CH, BD)
        offs_n = tl.arange(0, BN)
        n_ok = offs_n < N
        m_dn = ch_ok[:, None] & n_ok[None, :]
        ch64 = ch.to(tl.int64)
        A = tl.load(A_ptr + ch64[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
        A2 = A * 1.4426950408889634  # exp(Δ A) = exp2(Δ A log2 e)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
        bi64 = bi.to(tl.int64)
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
            raw_x = tl.load(dt_rows[:, None] + pos_x[None, :], mask=mx, other=0.0)
            if HAS_BIAS:
                raw_x = raw_x + bias[:, None]
            dlt_x = tl.where(mx, _delta_of(raw_x, SOFTPLUS), 0.0)
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

    @triton.jit(do_not_specialize=["L", "U_CH", "NCH", "G", "DG", "N", "NCB", "SEG_LEN", "NSEG"])
    def _fwd_seq_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, idx_ptr, y_ptr, hin_ptr, end_ptr, prod_ptr,
        L, U_CH, NCH, G, DG, N, NCB, SEG_LEN, NSEG,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, ROUTED: tl.constexpr,
        ACCUM: tl.constexpr, HAS_CARRY: tl.constexpr, END_ONLY: tl.constexpr,
        BD: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr,
    ):
        """Forward, one step at a time: each thread keeps its (channel, state) values of x in
        registers and walks the segment's steps in order (as mamba_ssm's kernel does), UNROLL
        steps per iteration so that their loads are in flight together.

        Program = (batch, block of BD channels, segment). END_ONLY: pass 1 (zero start; end
        state and decay product). Otherwise pass 3 (start from hin if HAS_CARRY; write y).
        """
        pid = tl.program_id(0)
        seg = tl.program_id(1)
        bi = pid // NCB
        cb = pid % NCB
        ch = cb * BD + tl.arange(0, BD)
        ch_ok = ch < NCH
        grp = ch // DG
        ch64 = ch.to(tl.int64)
        uch64 = (ch % U_CH).to(tl.int64)
        offs_n = tl.arange(0, BN)
        n_ok = offs_n < N
        m_dn = ch_ok[:, None] & n_ok[None, :]
        A = tl.load(A_ptr + ch64[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
        A2 = A * 1.4426950408889634
        if HAS_D:
            Dv = tl.load(D_ptr + ch, mask=ch_ok, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
        bi64 = bi.to(tl.int64)
        u_rows = u_ptr + (bi64 * U_CH + uch64) * L
        y_rows = y_ptr + (bi64 * U_CH + uch64) * L
        dt_rows = dt_ptr + (bi64 * NCH + ch64) * L
        bc_rows = ((bi64 * G + grp.to(tl.int64))[:, None] * N + offs_n[None, :]) * L  # (BD, BN)
        idx_rows = idx_ptr + grp.to(tl.int64) * L
        state_off = ((bi64 * NCH + ch64)[:, None] * NSEG + seg) * N + offs_n[None, :]
        if HAS_CARRY:
            h = tl.load(hin_ptr + state_off, mask=m_dn, other=0.0)
        else:
            h = tl.zeros((BD, BN), dtype=A.dtype)
        dsum = tl.zeros((BD,), dtype=A.dtype)
        t_begin = seg * SEG_LEN
        t_end = tl.minimum(t_begin + SEG_LEN, L)
        for t0 in range(t_begin, t_end, UNROLL):
            for j in tl.static_range(UNROLL):
                t = t0 + j
                ok = ch_ok & (t < t_end)
                if ROUTED:
                    pos = tl.load(idx_rows + t, mask=ok, other=0).to(tl.int64)
                else:
                    pos = t.to(tl.int64) + tl.zeros((BD,), dtype=tl.int64)
                raw = tl.load(dt_rows + pos, mask=ok, other=0.0)
                if HAS_BIAS:
                    raw = raw + bias
                dlt = tl.where(ok, _delta_of(raw, SOFTPLUS), 0.0)
                uu = tl.load(u_rows + pos, mask=ok, other=0.0)
                Bv = tl.load(B_ptr + bc_rows + pos[:, None], mask=ok[:, None] & n_ok[None, :], other=0.0)
                h = tl.exp2(dlt[:, None] * A2) * h + (dlt * uu)[:, None] * Bv
                if END_ONLY:
                    dsum += dlt
                else:
                    Cv = tl.load(C_ptr + bc_rows + pos[:, None], mask=ok[:, None] & n_ok[None, :], other=0.0)
                    y = tl.sum(h * Cv, axis=1)
                    if HAS_D:
                        y = y + Dv * uu
                    if ACCUM:
                        tl.atomic_add(y_rows + pos, y, mask=ok)
                    else:
                        tl.store(y_rows + pos, y, mask=ok)
        if END_ONLY:
            tl.store(end_ptr + state_off, h, mask=m_dn)
            tl.store(prod_ptr + state_off, tl.exp2(dsum[:, None] * A2), mask=m_dn)

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
        bi, grp, dblk, ch, ch_ok, uch = _program_coords(pid, G, NBLK_D, DG, U_CH, BD)
        offs_n = tl.arange(0, BN)
        n_ok = offs_n < N
        m_dn = ch_ok[:, None] & n_ok[None, :]
        ch64 = ch.to(tl.int64)
        A = tl.load(A_ptr + ch64[:, None] * N + offs_n[None, :], mask=m_dn, other=0.0)
        A2 = A * 1.4426950408889634  # exp(Δ A) = exp2(Δ A log2 e)
        if HAS_D:
            Dv = tl.load(D_ptr + ch, mask=ch_ok, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0)
        bi64 = bi.to(tl.int64)
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
            raw = tl.load(dt_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            if HAS_BIAS:
                raw = raw + bias[:, None]
            dlt = tl.where(m2, _delta_of(raw, SOFTPLUS), 0.0)
            uu = tl.load(u_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            dy = tl.load(dy_rows[:, None] + pos[None, :], mask=m2, other=0.0)
            Bt = tl.load(B_rows[:, None] + pos[None, :], mask=mn2, other=0.0)
            Ct = tl.load(C_rows[:, None] + pos[None, :], mask=mn2, other=0.0)
            # previous step (identity at the tile's first step): h_{t-1}
            p_ok = (j >= 1) & t_ok
            pos_p = _positions(idx_ptr, grp, offs_t - 1, p_ok, L, ROUTED)
            mp = ch_ok[:, None] & p_ok[None, :]
            raw_p = tl.load(dt_rows[:, None] + pos_p[None, :], mask=mp, other=0.0)
            if HAS_BIAS:
                raw_p = raw_p + bias[:, None]
            dlt_p = tl.where(mp, _delta_of(raw_p, SOFTPLUS), 0.0)
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
            raw_x = tl.load(dt_rows[:, None] + pos_x[None, :], mask=mx, other=0.0)
            if HAS_BIAS:
                raw_x = raw_x + bias[:, None]
            dlt_x = tl.where(mx, _delta_of(raw_x, SOFTPLUS), 0.0)
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
    """(steps per segment, segments) of the step kernel: enough programs to fill the GPU."""
    if seg_len is None:
        programs = b * -(-NCH // (block_d or SEQ_BLOCK_D))
        want = max(1, -(-SEQ_PROGRAMS_PER_SM * _sm_count(device) // programs))
        want = min(want, SEQ_MAX_SEGMENTS, max(1, L // SEQ_MIN_SEGMENT))
        seg_len = -(-L // want)
    seg_len = max(1, int(seg_len))
    return seg_len, -(-L // seg_len)


def _forward_step(u, delta, A, B, C, D, delta_bias, softplus, idx=None, accumulate=False, seg_len=None,
                  block_d=None):
    """``_forward`` with the step-sequential kernel."""
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    DG = NCH // G
    BD = block_d or SEQ_BLOCK_D
    BN = _next_pow2(N)
    ncb = -(-NCH // BD)
    seg_len, nseg = _step_segments(b, NCH, L, u.device, seg_len, BD)
    y = (torch.zeros if accumulate else torch.empty)(b, U_CH, L, device=u.device, dtype=u.dtype)
    if L == 0:
        return y
    common = dict(L=L, U_CH=U_CH, NCH=NCH, G=G, DG=DG, N=N, NCB=ncb, SEG_LEN=seg_len, NSEG=nseg)
    flags = dict(HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
                 ROUTED=idx is not None, BD=BD, BN=BN, UNROLL=SEQ_UNROLL)
    Dp = D if D is not None else A
    bp = delta_bias if delta_bias is not None else A
    ip = idx if idx is not None else u
    hin = u
    grid = (b * ncb, nseg)
    if nseg > 1:
        end = torch.empty(b, NCH, nseg, N, device=u.device, dtype=u.dtype)
        prod = torch.empty_like(end)
        _fwd_seq_kernel[grid](u, delta, A, B, C, Dp, bp, ip, y, u, end, prod, **common, **flags,
                              ACCUM=False, HAS_CARRY=False, END_ONLY=True, num_warps=SEQ_WARPS)
        hin = torch.empty_like(end)
        # the chain's layout is (b, channel, segment, state): one "group" of all NCH channels
        _carry_kernel[(b * ncb,)](end, prod, hin, NCH, 1, NCH, N, ncb, nseg, NCH,
                                  REVERSE=False, BD=BD, BN=BN, num_warps=1)
    _fwd_seq_kernel[grid](u, delta, A, B, C, Dp, bp, ip, y, hin, u, u, **common, **flags,
                          ACCUM=bool(accumulate), HAS_CARRY=nseg > 1, END_ONLY=False, num_warps=SEQ_WARPS)
    return y


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
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias) for ``_forward``'s layout and options."""
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
    idx = route_index(tuple(routes.split(",")), height, width, u.device)
    return _forward(u, delta, A, B, C, D, delta_bias, True, idx=idx, accumulate=accumulate)


def _route_scan_bwd_impl(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                         dy: Tensor, routes: str, height: int, width: int, accumulate: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    idx = route_index(tuple(routes.split(",")), height, width, u.device)
    return _backward(u, delta, A, B, C, D, delta_bias, True, dy.contiguous(), idx=idx, accumulate=accumulate)


# A custom operator (opaque to torch.compile, so a compiled model keeps the kernels and takes no
# graph break; the route index is looked up inside, from the route names and the grid size).
_route_scan = torch.library.custom_op("eabench::route_scan", mutates_args=())(_route_scan_impl)
_route_scan_bwd = torch.library.custom_op("eabench::route_scan_bwd", mutates_args=())(_route_scan_bwd_impl)


@_route_scan.register_fake
def _(u, delta, A, B, C, D, delta_bias, routes, height, width, accumulate):
    return u.new_empty(u.shape)


@_route_scan_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, dy, routes, height, width, accumulate):
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), D.new_empty(D.shape), delta_bias.new_empty(delta_bias.shape))


def _route_scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, routes, height, width, accumulate = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
    ctx.route = (routes, height, width, accumulate)


def _route_scan_backward(ctx, dy):
    grads = _route_scan_bwd(*ctx.saved_tensors, dy, *ctx.route)
    return (*grads, None, None, None, None)


_route_scan.register_autograd(_route_scan_backward, setup_context=_route_scan_setup)


@functools.lru_cache(maxsize=256)
def _split_length(L: int) -> int:
    """A divisor of L near 2048: the chunk length of the split-K weight gradients."""
    for c in range(min(L, 2048), 0, -1):
        if L % c == 0 and (c >= 256 or c == L or L // c <= 4096):
            return c
    return L


class _HeadProjection(torch.autograd.Function):
    """y[b, k, c, l] = Σ_d W[k, c, d] x[b, k', d, l] with k' = k, or k' = 0 for x shared by heads.

    The same as einsum("bkdl,kcd->bkcl"), but the weight gradient (a reduction over B·L) is
    computed as many partial products over chunks of L and then summed: as one matrix product
    it has tiny output tiles and an enormous reduction, which cuBLAS runs on a few blocks.
    """

    @staticmethod
    def forward(ctx, x, W):
        ctx.save_for_backward(x, W)
        if x.shape[1] == W.shape[0]:
            return torch.einsum("bkdl,kcd->bkcl", x, W)
        return torch.einsum("bdl,kcd->bkcl", x[:, 0], W)

    @staticmethod
    def backward(ctx, dy):
        x, W = ctx.saved_tensors
        b, K, c, L = dy.shape
        shared = x.shape[1] != K
        dx = dW = None
        if ctx.needs_input_grad[0]:
            if shared:
                dx = torch.einsum("bkcl,kcd->bdl", dy, W).unsqueeze(1)
            else:
                dx = torch.einsum("bkcl,kcd->bkdl", dy, W)
        if ctx.needs_input_grad[1]:
            lc = _split_length(L)
            S = L // lc
            d = x.shape[2]
            dy5 = dy.reshape(b, K, c, S, lc).transpose(2, 3)  # (b, K, S, c, lc)
            x5 = x.reshape(b, x.shape[1], d, S, lc).permute(0, 1, 3, 4, 2)  # (b, K|1, S, lc, d)
            dW = torch.matmul(dy5, x5).sum((0, 2))  # (K, c, d)
        return dx, dW


def _head_projection(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return _HeadProjection.apply(x, W)


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

    The projections are computed in raster order (they act position by position, so they
    commute with the permutations); the scan then reads x, Δ, B, C and writes y through each
    head's route index. Returns (B, D, H·W) in x's dtype, differentiable in every input.
    """
    b, D, h, w = x.shape
    L = h * w
    K, _, d = x_proj_weight.shape
    R = dt_projs_weight.shape[-1]
    N = A_logs.shape[-1]
    if merge not in ("concat", "add"):
        raise ValueError(f"unknown merge {merge!r}; valid merges: ['concat', 'add']")
    if len(head_routes) != K:
        raise ValueError(f"{len(head_routes)} head routes for {K} heads")
    if any("," in r for r in head_routes):
        raise ValueError(f"route names cannot contain ',': {head_routes}")
    flat = x.reshape(b, D, L)
    heads_in = flat.view(b, K, d, L) if merge == "concat" else flat.view(b, 1, D, L)
    x_dbl = _head_projection(heads_in, x_proj_weight)  # (B, K, R + 2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = _head_projection(dts, dt_projs_weight)  # (B, K, d, L), raster order
    work = torch.float64 if x.dtype == torch.float64 else torch.float32

    def prep(t):
        return t.to(work).contiguous()

    y = _route_scan(
        prep(flat), prep(dts.reshape(b, K * d, L)), prep(-torch.exp(A_logs.to(work))), prep(Bs), prep(Cs),
        prep(Ds), prep(dt_projs_bias.reshape(-1)), ",".join(head_routes), h, w, merge == "add",
    )
    return y.to(x.dtype)


# Above this many positions the routed reads (one sector per step and channel on column and
# diagonal routes) cost more than materialising the permuted copies: measured on an H200,
# fused was faster at 256² and slower at 512² and 1024².
FUSE_MAX_POSITIONS = 1 << 17


def can_fuse(x: torch.Tensor, backend: str = "auto") -> bool:
    """True when ``multi_route_scan(x, ..., backend)`` should call ``fused_multi_route_scan``:
    the scan resolves to the triton backend and the map has at most FUSE_MAX_POSITIONS."""
    from harness.ops.selective_scan import resolve_backend

    if x.dim() != 4 or x.shape[-1] * x.shape[-2] > FUSE_MAX_POSITIONS:
        return False
    try:
        return resolve_backend(backend, x.device) == "triton"
    except (ValueError, RuntimeError):
        return False
