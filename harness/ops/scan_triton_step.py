"""The step kernels of the Triton selective scan: one step at a time, one thread per channel.

The recurrence x_t = a_t ⊙ x_{t-1} + b_t (a_t = exp(Δ_t A), b_t = Δ_t B_t u_t, per channel and
state) is walked one step per loop iteration, with one thread per channel holding all of that
channel's states in registers, so neither the recurrence nor the sum over states y_t = C_t · x_t
needs any communication between threads. Strides are run-time arguments: the fused multi-route
scan feeds channels-last tensors (one contiguous run of channels per step and route group). The
states are held as chunks of four, so a thread reads four states of B or C in one 16-byte load
(when the rows are aligned). Each iteration issues its loads before its stores and reads the
route positions one iteration ahead.

Long sequences are cut into segments so that batch-1 shapes fill a GPU, joined in two passes:
1. every segment scans from a zero state and stores its end state and the product of its a_t
   (``END_ONLY``);
2. ``segment_carry_kernel`` chains them (carry_{s+1} = end_s + prod_s ⊙ carry_s) by associative
   scans over blocks of segments, giving every segment its true starting state;
3. every segment rescans from that state and writes y_t = C_t · x_t + D u_t.

The backward kernel is the step kernel's adjoint: the forward states are recomputed once and
stored for every step, then the adjoint is walked backwards one step at a time with the same
layout, routing and segment chain (run from the right); the sums over channels that dB and dC
need run across lanes.

Route fusion (``ROUTED``): with ``idx`` (one permutation of the H·W positions per B/C group,
int32), step t of group k reads and writes position ``idx[k, t]`` of raster-ordered tensors, so
the permuted copies of a multi-route scan are never materialised; ``ACCUM`` adds the outputs of
channels that share an input channel (the ``add`` merge) with atomic adds.

Launchers: ``harness/ops/scan_triton_launch.py``. ``TRITON_INTERPRET=1`` (set before import)
runs the kernels on CPU tensors, which is how the tests check their logic without a GPU.
"""

from __future__ import annotations

try:  # Triton is optional: without it these kernels are not defined.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _combine(a_l, b_l, a_r, b_r):
        # Compose step l then step r: x -> a_r (a_l x + b_l) + b_r. With reverse=True the same
        # function scans g_t = a_t g_{t+1} + b_t.
        return a_l * a_r, a_r * b_l + b_r


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
    def step_fwd_kernel(
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
    def step_bwd_kernel(
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
    def segment_carry_kernel(end_ptr, prod_ptr, out_ptr, NSEG, M, BS: tl.constexpr, BM: tl.constexpr,
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
