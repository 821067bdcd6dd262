"""Launchers of the Triton selective scan: block sizes, segments, layouts, and the settings.

``forward_step`` / ``backward_step`` run the step kernels (``harness/ops/scan_triton_step.py``)
on tensors of any strides; ``forward_tile`` / ``backward_tile`` the tile kernels
(``harness/ops/scan_triton_tile.py``) on contiguous ones. ``forward`` / ``backward`` pick the
family from the settings. Layout of every launcher: u (b, U_CH, L), delta (b, NCH, L), A (NCH, N),
B/C (b, G, N, L); scan channel c belongs to group c // (NCH / G) and reads u channel c % U_CH;
with ``idx`` (G, L) int32, its step t is position idx[group, t] (route fusion), and
``accumulate`` adds the outputs of scan channels that share a u channel (the add merge).

Every tuning knob lives in one ``TritonScanSettings``; ``scan_settings(**changes)`` changes
some of them inside a block (benchmarks sweep them that way), ``current_settings()`` reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings

import torch

from harness.ops import scan_triton_step as step_kernels
from harness.ops import scan_triton_tile as tile_kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class TritonScanSettings:
    """Tuning knobs of the Triton scan (defaults: the fastest measured on an H100/H200; see
    reports/hardware/h200/ for the sweeps behind them)."""

    forward_kernel: str = "step"  # "step" (one step per iteration) or "tile" (associative scans)
    backward_kernel: str = "step"  # "step" (the step kernel's adjoint) or "tile"
    # tile kernels: element budgets of one program's (channels × states × steps) tile, channels
    # per block, programs wanted per multiprocessor, segments at most, warps
    fwd_tile_elements: int = 4096
    bwd_tile_elements: int = 2048
    max_block_d: int = 8
    programs_per_sm: int = 4
    max_segments: int = 512
    fwd_warps: int = 4
    bwd_warps: int = 4
    # step kernels: warps per program (32 channels each), steps per loop iteration (forward,
    # backward), segments cut until about step_warps_per_sm warps per multiprocessor (at most
    # step_max_segments, each at least step_min_segment steps), register cap (None: compiler's)
    step_warps: int = 1
    step_unroll: int = 1
    step_bwd_unroll: int = 1
    step_warps_per_sm: int = 32
    step_max_segments: int = 4096
    step_min_segment: int = 32
    step_maxnreg: int | None = None
    # the step kernels' segment chain: segments per associative scan, state-channel pairs per
    # program, warps
    carry_block_s: int = 64
    carry_block_m: int = 32
    carry_warps: int = 4
    # Largest map (H·W) whose routes are fused while the forward kernel is "tile" (its routed
    # reads cost one 32-byte sector per step and channel; materialised copies win on large maps).
    # The step kernel reads channels-last runs and fuses every size.
    fuse_max_positions: int = 1 << 17
    # The interpreter runs tl.associative_scan element by element (minutes for a small tile):
    # the tile kernels use an equivalent step loop there unless this is set.
    assoc_scan_in_interpreter: bool = False

    def __post_init__(self):
        for name in ("forward_kernel", "backward_kernel"):
            if getattr(self, name) not in ("step", "tile"):
                raise ValueError(f"{name} must be 'step' or 'tile', got {getattr(self, name)!r}")


_settings = TritonScanSettings()


def current_settings() -> TritonScanSettings:
    """The settings every launch reads now."""
    return _settings


@contextlib.contextmanager
def scan_settings(**changes):
    """Change some ``TritonScanSettings`` fields inside the block (unknown names raise TypeError)."""
    global _settings
    previous = _settings
    _settings = dataclasses.replace(previous, **changes)
    try:
        yield _settings
    finally:
        _settings = previous


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# --- launch configuration -------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def tile_config(b: int, G: int, DG: int, L: int, N: int, device: torch.device, backward: bool,
                block_d: int | None = None, block_t: int | None = None, seg_tiles: int | None = None) -> dict:
    """Block sizes and segmentation for one call (overrides are for tests and sweeps)."""
    BN = _next_pow2(N)
    BD = block_d or min(_next_pow2(DG), _settings.max_block_d)
    budget = _settings.bwd_tile_elements if backward else _settings.fwd_tile_elements
    BT = block_t or max(16, min(256, _next_pow2(max(1, budget // (BD * BN))), _next_pow2(L)))
    if INTERPRET and block_t is None:
        BT = min(BT, 16)  # the interpreter's cost grows with the tile's step loop
    nblk_d = -(-DG // BD)
    ntiles = -(-L // BT)
    if seg_tiles is None:
        programs = b * G * nblk_d
        want = max(1, -(-_settings.programs_per_sm * _sm_count(device) // programs))
        want = min(want, _settings.max_segments, ntiles)
        seg_tiles = -(-ntiles // want)
    seg_tiles = max(1, min(int(seg_tiles), ntiles))
    nseg = -(-ntiles // seg_tiles)
    return dict(BD=BD, BN=BN, BT=BT, NBLK_D=nblk_d, NTILES=ntiles, SEG_TILES=seg_tiles, NSEG=nseg)


def _tile_blocks(cfg: dict) -> dict:
    """The tile kernels' block sizes; SEQ: the interpreter's step loop instead of associative scans."""
    return dict(BD=cfg["BD"], BN=cfg["BN"], BT=cfg["BT"], SEQ=INTERPRET and not _settings.assoc_scan_in_interpreter)


def _tile_grid0(b, G, cfg):
    return b * G * cfg["NBLK_D"]


# --- launchers ------------------------------------------------------------------------------

def step_segments(b: int, NCH: int, L: int, device, seg_len: int | None = None, block_d: int | None = None):
    """(steps per segment, segments) of the step kernel: enough warps to fill the GPU."""
    BD = block_d or 32 * _settings.step_warps
    if seg_len is None:
        warps = b * -(-NCH // BD) * max(1, BD // 32)
        want = max(1, -(-_settings.step_warps_per_sm * _sm_count(device) // warps))
        want = min(want, _settings.step_max_segments, max(1, L // _settings.step_min_segment))
        seg_len = -(-L // want)
    seg_len = max(1, int(seg_len))
    return seg_len, -(-L // seg_len)


def seq_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A (b, c, L) tensor stored as (b, L, c): the layout the step kernels read coalesced."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def bc_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A (b, g, n, L) B/C tensor stored as (b, L, g, n): unit stride along the states."""
    return t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)


def vector_states(B: torch.Tensor, C: torch.Tensor, N: int) -> bool:
    """Whether the step kernels may read B and C four states at a time (16-byte loads): float32,
    N a power of two ≥ 4 (no state mask), and every (batch, group, position) row 16-byte aligned."""
    if N < 4 or N & (N - 1):
        return False
    for t in (B, C):
        rows_aligned = t.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in (t.stride(0), t.stride(1), t.stride(3)))
        if t.dtype != torch.float32 or not rows_aligned:
            return False
    return True


def _step_setup(u, delta, A, B, C, D, delta_bias, softplus, idx, seg_len, block_d, extra=()):
    """What the step kernels' launches share: B/C in (b, L, g, n) memory, the size checks, the
    run-time sizes and strides, the flags, the grid and the placeholder pointers."""
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    BD = block_d or 32 * _settings.step_warps
    seg_len, nseg = step_segments(b, NCH, L, u.device, seg_len, BD)
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
                 ROUTED=idx is not None, BD=BD, BN=BN, VN=min(4, BN), VEC_BC=vector_states(B, C, N))
    warps = max(1, min(BD // 32, 8)) if BD >= 32 else 1
    maxnreg = _settings.step_maxnreg
    launch = dict(num_warps=warps) | ({"maxnreg": maxnreg} if maxnreg and not INTERPRET else {})
    ptrs = (D if D is not None else A, delta_bias if delta_bias is not None else A, idx if idx is not None else u)
    return B, C, sizes, strides, flags, launch, (-(-NCH // BD), nseg, b), ptrs


def _step_segment_starts(u, delta, A, B, C, ptrs, sizes, strides, flags, launch, grid):
    """Passes 1-2 of the step forward: the state entering every segment, (b, nseg, N, NCH)."""
    Dp, bp, ip = ptrs
    b, nseg, N, NCH = u.shape[0], sizes["NSEG"], sizes["N"], sizes["NCH"]
    end = torch.empty(b, nseg, N, NCH, device=u.device, dtype=u.dtype)
    prod = torch.empty_like(end)
    step_kernels.step_fwd_kernel[grid](u, delta, A, B, C, Dp, bp, ip, u, u, end, prod, u, **sizes, **strides, **flags,
                           sy_b=0, sy_c=0, sy_l=0, ACCUM=False, HAS_CARRY=False, END_ONLY=True,
                           UNROLL=_settings.step_unroll, **launch)
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
    BS = 8 if INTERPRET else _settings.carry_block_s
    BM = min(_settings.carry_block_m, _next_pow2(M))
    step_kernels.segment_carry_kernel[(-(-M // BM), b)](end, prod, out, nseg, M, BS=BS, BM=BM, SEQ=INTERPRET,
                                            num_warps=_settings.carry_warps)
    return out


def forward_step(u, delta, A, B, C, D, delta_bias, softplus, idx=None, accumulate=False, seg_len=None,
                  block_d=None, out=None):
    """``forward`` with the step kernel. Every tensor may have any strides (channels-last views
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
    step_kernels.step_fwd_kernel[grid](u, delta, A, B, C, *ptrs, y, hin, u, u, u, **sizes, **strides, **flags,
                           **dict(zip(("sy_b", "sy_c", "sy_l"), y.stride())), ACCUM=bool(accumulate),
                           HAS_CARRY=sizes["NSEG"] > 1, END_ONLY=False, UNROLL=_settings.step_unroll, **launch)
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


def backward_step(u, delta, A, B, C, D, delta_bias, softplus, dy, idx=None, accumulate=False, seg_len=None,
                   block_d=None):
    """``backward`` with the step kernels (any input strides; routed through ``idx``).

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
    step_kernels.step_fwd_kernel[grid](u, delta, A, B, C, *ptrs, u, hin, u, u, states, **sizes, **strides, **flags,
                           sy_b=0, sy_c=0, sy_l=0, ACCUM=False, HAS_CARRY=nseg > 1, END_ONLY=False,
                           WRITE_Y=False, STORE_H=True, UNROLL=_settings.step_unroll, **launch)
    du = _channels_last_like(u, zero=bool(accumulate))
    ddelta = _channels_last_like(delta)
    dB_part = torch.empty(b, L, P, N, device=dev, dtype=dt_)
    dC_part = torch.empty_like(dB_part)
    dA_part = torch.empty(b, nseg, N, NCH, device=dev, dtype=dt_)
    args = (u, delta, A, B, C, *ptrs, dy, states)
    bwd = dict(**sizes, **strides, **dict(zip(("sy_b", "sy_c", "sy_l"), dy.stride())),
               **dict(zip(("sdu_b", "sdu_c", "sdu_l"), du.stride())),
               **dict(zip(("sdd_b", "sdd_c", "sdd_l"), ddelta.stride())),
               **flags, W=W, UNROLL=_settings.step_bwd_unroll, **launch)
    gin = u
    if nseg > 1:
        gend = torch.empty(b, nseg, N, NCH, device=dev, dtype=dt_)
        gprod = torch.empty_like(gend)
        step_kernels.step_bwd_kernel[grid](*args, u, u, u, u, u, u, gend, gprod, ACCUM=False, HAS_CARRY=False,
                               END_ONLY=True, **bwd)
        gin = _chain_segments(gend, gprod, reverse=True)
    step_kernels.step_bwd_kernel[grid](*args, gin, du, ddelta, dA_part, dB_part, dC_part, u, u, ACCUM=bool(accumulate),
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
    return _step_partial_width(NCH // G, block_d or 32 * _settings.step_warps) is not None


def use_step_backward(A: torch.Tensor, B: torch.Tensor) -> bool:
    """The step backward is selected (``backward_kernel``) and its channel blocks fit A's groups."""
    return _settings.backward_kernel == "step" and step_backward_supported(A.shape[0], B.shape[1])


_step_kernel_failed = False


def _note_step_kernel_failure(error: Exception) -> None:
    """Use the tile forward from now on in this process (once the step kernel failed to build)."""
    global _step_kernel_failed
    _step_kernel_failed = True
    warnings.warn(f"triton step-sequential scan failed ({type(error).__name__}: {error}); using the tile kernel")


def forward_kernel_in_use() -> str:
    """The forward kernel family launches use now: the setting, unless the step kernel failed here."""
    return "tile" if _step_kernel_failed else _settings.forward_kernel


def forward(u, delta, A, B, C, D, delta_bias, softplus, idx=None, accumulate=False, **overrides):
    """y (b, U_CH, L): u (b, U_CH, L), delta (b, NCH, L), A (NCH, N), B/C (b, G, N, L).

    Scan channel c belongs to group c // (NCH / G) and reads u channel c % U_CH; with ``idx``
    (G, L) int32, its step t is position idx[group, t]. ``accumulate`` adds the outputs of
    scan channels that share a u channel (the add merge).
    """
    if _settings.forward_kernel == "step" and not _step_kernel_failed and not overrides:
        try:
            return forward_step(u, delta, A, B, C, D, delta_bias, softplus, idx, accumulate)
        except Exception as e:  # a compiler that rejects the step kernel: keep the tile kernel
            if INTERPRET:
                raise
            _note_step_kernel_failure(e)
    return forward_tile(u, delta, A, B, C, D, delta_bias, softplus, idx, accumulate, **overrides)


def forward_tile(u, delta, A, B, C, D, delta_bias, softplus, idx=None, accumulate=False, **overrides):
    """``forward`` with the tile kernel (associative scans over tiles of steps)."""
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    DG = NCH // G
    cfg = tile_config(b, G, DG, L, N, u.device, False, **overrides)
    y = (torch.zeros if accumulate else torch.empty)(b, U_CH, L, device=u.device, dtype=u.dtype)
    if L == 0:
        return y
    grid0 = _tile_grid0(b, G, cfg)
    common = dict(L=L, U_CH=U_CH, NCH=NCH, G=G, DG=DG, N=N, NBLK_D=cfg["NBLK_D"],
                  SEG_TILES=cfg["SEG_TILES"], NSEG=cfg["NSEG"], NTILES=cfg["NTILES"])
    blocks = _tile_blocks(cfg)
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
        tile_kernels.tile_fwd_kernel[(grid0, cfg["NSEG"])](
            u, delta, A, B, C, Dp, bp, ip, y, u, end, prod, u, **common, **flags,
            ACCUM=False, HAS_CARRY=False, END_ONLY=True, STORE_STATES=False, WRITE_Y=False,
            **blocks, num_warps=_settings.fwd_warps)
        hin = torch.empty_like(end)
        tile_kernels.tile_carry_kernel[(grid0,)](end, prod, hin, NCH, G, DG, N, cfg["NBLK_D"], cfg["NSEG"], U_CH,
                                REVERSE=False, BD=cfg["BD"], BN=cfg["BN"], num_warps=1)
    tile_kernels.tile_fwd_kernel[(grid0, cfg["NSEG"])](
        u, delta, A, B, C, Dp, bp, ip, y, hin, u, u, u, **common, **flags,
        ACCUM=bool(accumulate), HAS_CARRY=cfg["NSEG"] > 1, END_ONLY=False, STORE_STATES=False,
        WRITE_Y=True, **blocks, num_warps=_settings.fwd_warps)
    return y


def backward(u, delta, A, B, C, D, delta_bias, softplus, dy, idx=None, accumulate=False, **overrides):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias) for ``forward``'s layout and options: the step
    kernels (setting ``backward_kernel``) where their channel blocks fit the groups, else the tile kernels
    (also when ``overrides`` pick tile sizes)."""
    if not overrides and use_step_backward(A, B):
        return backward_step(u, delta, A, B, C, D, delta_bias, softplus, dy, idx, accumulate)
    return backward_tile(u, delta, A, B, C, D, delta_bias, softplus, dy, idx, accumulate, **overrides)


def backward_tile(u, delta, A, B, C, D, delta_bias, softplus, dy, idx=None, accumulate=False, **overrides):
    """``backward`` with the tile kernels (inputs contiguous)."""
    b, U_CH, L = u.shape
    NCH, N = A.shape
    G = B.shape[1]
    DG = NCH // G
    cfg = tile_config(b, G, DG, L, N, u.device, True, **overrides)
    dev, dt_ = u.device, u.dtype
    grid0 = _tile_grid0(b, G, cfg)
    NSEG, NBLK_D = cfg["NSEG"], cfg["NBLK_D"]
    common = dict(L=L, U_CH=U_CH, NCH=NCH, G=G, DG=DG, N=N, NBLK_D=NBLK_D,
                  SEG_TILES=cfg["SEG_TILES"], NSEG=NSEG, NTILES=cfg["NTILES"])
    blocks = _tile_blocks(cfg)
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
        tile_kernels.tile_fwd_kernel[(grid0, NSEG)](
            u, delta, A, B, C, Dp, bp, ip, u, u, end, prod, u, **common, **flags, HAS_D=False,
            ACCUM=False, HAS_CARRY=False, END_ONLY=True, STORE_STATES=False, WRITE_Y=False,
            **blocks, num_warps=_settings.fwd_warps)
        gend = torch.empty_like(end)
        gprod = torch.empty_like(end)
        tile_kernels.tile_bwd_segment_kernel[(grid0, NSEG)](
            delta, A, C, bp, ip, dy, gend, gprod, **common, **flags, **blocks, num_warps=_settings.bwd_warps)
        hin = torch.empty_like(end)
        gin = torch.empty_like(end)
        tile_kernels.tile_carry_kernel[(grid0,)](end, prod, hin, NCH, G, DG, N, NBLK_D, NSEG, U_CH,
                                REVERSE=False, BD=cfg["BD"], BN=cfg["BN"], num_warps=1)
        tile_kernels.tile_carry_kernel[(grid0,)](gend, gprod, gin, NCH, G, DG, N, NBLK_D, NSEG, U_CH,
                                REVERSE=True, BD=cfg["BD"], BN=cfg["BN"], num_warps=1)
    states = torch.empty(b, NCH, cfg["NTILES"], N, device=dev, dtype=dt_)
    tile_kernels.tile_fwd_kernel[(grid0, NSEG)](
        u, delta, A, B, C, Dp, bp, ip, u, hin, u, u, states, **common, **flags, HAS_D=False,
        ACCUM=False, HAS_CARRY=NSEG > 1, END_ONLY=False, STORE_STATES=True, WRITE_Y=False,
        **blocks, num_warps=_settings.fwd_warps)
    tile_kernels.tile_bwd_kernel[(grid0, NSEG)](
        u, delta, A, B, C, Dp, bp, ip, dy, states, gin, du, ddelta, dA_part, dB, dC,
        **common, **flags, HAS_D=D is not None, ACCUM=bool(accumulate), HAS_CARRY=NSEG > 1,
        **blocks, num_warps=_settings.bwd_warps)
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


