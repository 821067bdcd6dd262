"""Scan routes: the orders in which a vision SSM reads the H×W positions of a feature map.

A route is a permutation ``perm`` of the flat positions ``i * W + j``: step ``t`` of the scan
reads position ``perm[t]``; ``inverse[perm[t]] = t`` puts the results back.

Route names follow one grammar, ``<pattern>[_<view>][_rev]``:

- pattern: ``h`` (row-major raster), ``v`` (column-major raster), ``diag`` (anti-diagonals
  i + j = s for s = 0..H+W-2, rows increasing inside each), ``zigzag`` (the release's
  alternating anti-diagonals), ``hilbert`` (Hilbert curve on the next power-of-two square,
  restricted to H×W), ``zorder`` (true Morton curve), ``zorder_release`` (the release's
  Morton code, whose bit masks are applied one step out of order so codes collide: it is
  not a space-filling curve, but the paper's ablation used it);
- view (optional): the pattern applied to a transformed image — ``mirror`` (left-right),
  ``vflip`` (up-down) or ``rot180``;
- ``_rev``: the whole sequence read backwards.

Aliases give the released eight their short names: ``antidiag`` = ``diag_mirror``.

Named route sets:

- ``all_around``: the released eight in the released head order
  (diag, diag_rev, antidiag, antidiag_rev, h, h_rev, v, v_rev);
- ``cross``: h, h_rev, v, v_rev; ``bidirectional``: h, h_rev; ``raster``: h;
- ``<pattern>4`` (e.g. ``diag4``, ``zigzag4``, ``hilbert4``, ``zorder4``): the pattern, its
  reverse, the pattern on the mirrored image and that reversed;
- ``<pattern>4_flips``: the pattern on the image, rotated 180°, mirrored and flipped up-down.
  This is how the released code builds its 4-route sets: it "reverses" by flipping the
  sequence *before* indexing, so its head 1 is the pattern on the 180°-rotated image and its
  head 3 the pattern on the up-down flipped image. For ``diag`` both readings coincide; for
  zigzag, Hilbert and z-order they differ;
- ``all_around_<pattern>`` / ``all_around_<pattern>_flips``: those four plus h, h_rev, v, v_rev.

What the release runs for its 4-route ablations: ``diag4_flips``, ``zigzag4_flips``,
``hilbert4_flips`` and, for z-order, ``zorder_release4_flips`` (its colliding codes). The release
orders cells whose codes collide with ``torch.argsort``, an unstable sort whose order among equal
keys depends on the platform; we order them by raster position (a stable sort), so
``zorder_release`` routes are the release's up to the order inside each group of tied cells.
``zorder4_flips`` is the true Morton curve with the release's flips, which the release never ran.
The ``_flips`` sets were once named ``<pattern>4_release`` (``all_around_<pattern>_release``): those
names still resolve, except ``zorder4_release``, which read as "the release's z-order" but ran the
true Morton curve, and now raises an error naming both sets.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

PATTERNS = ("h", "v", "diag", "zigzag", "hilbert", "zorder", "zorder_release")
VIEWS = ("mirror", "vflip", "rot180")
ALIASES = {"antidiag": "diag_mirror", "antidiag_rev": "diag_mirror_rev"}

ROUTE_SETS: dict[str, tuple[str, ...]] = {
    "all_around": ("diag", "diag_rev", "antidiag", "antidiag_rev", "h", "h_rev", "v", "v_rev"),
    "cross": ("h", "h_rev", "v", "v_rev"),
    "bidirectional": ("h", "h_rev"),
    "raster": ("h",),
}
for _p in ("diag", "zigzag", "hilbert", "zorder", "zorder_release"):
    ROUTE_SETS[f"{_p}4"] = (_p, f"{_p}_rev", f"{_p}_mirror", f"{_p}_mirror_rev")
    ROUTE_SETS[f"{_p}4_flips"] = (_p, f"{_p}_rot180", f"{_p}_mirror", f"{_p}_vflip")
    ROUTE_SETS[f"all_around_{_p}"] = ROUTE_SETS[f"{_p}4"] + ROUTE_SETS["cross"]
    ROUTE_SETS[f"all_around_{_p}_flips"] = ROUTE_SETS[f"{_p}4_flips"] + ROUTE_SETS["cross"]
del _p

# The sets' former names: each still resolves where it said what it ran.
RENAMED_SETS = {f"{p}4_release": f"{p}4_flips" for p in ("diag", "zigzag", "hilbert", "zorder_release")}
RENAMED_SETS |= {f"all_around_{p}_release": f"all_around_{p}_flips"
                 for p in ("diag", "zigzag", "hilbert", "zorder_release")}
# ... and these did not: "zorder4_release" ran the true Morton curve, not the release's z-order.
# ("all_around_zorder_release" is all_around_<pattern> of the zorder_release pattern, as before.)
MISLEADING_SETS = {"zorder4_release": ("zorder4_flips", "zorder_release4_flips")}


def _parse(name: str) -> tuple[str, str | None, bool]:
    """Split a route name into (pattern, view, reversed); raise ValueError naming valid forms."""
    canonical = ALIASES.get(name, name)
    rev = canonical.endswith("_rev")
    stem = canonical[: -len("_rev")] if rev else canonical
    for pattern in sorted(PATTERNS, key=len, reverse=True):  # zorder_release before zorder
        if stem == pattern:
            return pattern, None, rev
        for view in VIEWS:
            if stem == f"{pattern}_{view}":
                return pattern, view, rev
    raise ValueError(
        f"unknown scan route {name!r}; valid routes are <pattern>[_<view>][_rev] with pattern in "
        f"{list(PATTERNS)} and view in {list(VIEWS)}, or aliases {sorted(ALIASES)} "
        f"(e.g. {list(ROUTE_SETS['all_around'])})"
    )


def is_route(name: str) -> bool:
    """True if ``name`` parses as a route name."""
    try:
        _parse(name)
    except ValueError:
        return False
    return True


def resolve_directions(directions: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Turn a route-set name or a list of route names into a validated tuple of route names."""
    if isinstance(directions, str):
        if directions in MISLEADING_SETS:
            morton, release = MISLEADING_SETS[directions]
            raise ValueError(
                f"route set {directions!r} was renamed: it ran the true Morton curve with the release's flips "
                f"(now {morton!r}), not the release's own z-order, which is {release!r} (its colliding codes)"
            )
        directions = RENAMED_SETS.get(directions, directions)
        if directions in ROUTE_SETS:
            return ROUTE_SETS[directions]
        if not is_route(directions):
            raise ValueError(
                f"unknown directions {directions!r}: not a route set ({sorted(ROUTE_SETS)}) "
                f"nor a route name (<pattern>[_<view>][_rev], see harness/ops/routes.py)"
            )
        return (directions,)
    names = tuple(str(d) for d in directions)
    if not names:
        raise ValueError("directions must name at least one scan route")
    for name in names:
        _parse(name)  # raises with the list of valid names
    return names


# --- base patterns: numpy int64 arrays of flat indices, length H*W ---------------------------

def _diag(h: int, w: int) -> np.ndarray:
    rows, cols = np.divmod(np.arange(h * w), w)
    # sort by anti-diagonal s = i + j, then by row (lexsort: last key is primary)
    return np.lexsort((rows, rows + cols))


def _zigzag(h: int, w: int) -> np.ndarray:
    # The release walks anti-diagonal s with the row decreasing when (s - h + 1) is odd and
    # increasing otherwise, so the parity depends on H (JPEG's order when H is even).
    rows, cols = np.divmod(np.arange(h * w), w)
    s = rows + cols
    row_key = np.where((s - h + 1) % 2 == 1, -rows, rows)
    return np.lexsort((row_key, s))


def _hilbert_d(order: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Hilbert index of points (x, y) on a 2**order square (Skilling's transpose form, 2-D)."""
    x = x.astype(np.int64).copy()
    y = y.astype(np.int64).copy()
    # Inverse undo: Skilling's AxestoTranspose for n = 2 dimensions.
    m = 1 << (order - 1) if order > 0 else 0
    q = m
    while q > 1:
        p = q - 1
        # dimension 0
        cond = (x & q) != 0
        x = np.where(cond, x ^ p, x)
        # dimension 1: if bit set invert low bits of x, else exchange low bits of x and y
        cond = (y & q) != 0
        t = (x ^ y) & p
        x_new = np.where(cond, x ^ p, x ^ t)
        y_new = np.where(cond, y, y ^ t)
        x, y = x_new, y_new
        q >>= 1
    # Gray encode
    y ^= x
    t = np.zeros_like(x)
    q = m
    while q > 1:
        t = np.where((y & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x ^= t
    y ^= t
    # interleave the transposed bits, x's bit first (most significant)
    d = np.zeros_like(x)
    for b in range(order - 1, -1, -1):
        d = (d << 2) | (((x >> b) & 1) << 1) | ((y >> b) & 1)
    return d


def _hilbert(h: int, w: int) -> np.ndarray:
    # As released: first coordinate = row; the curve is built on the next power-of-two square
    # and restricted to the H×W grid.
    order = max(0, math.ceil(math.log2(max(h, w))))
    rows, cols = np.divmod(np.arange(h * w), w)
    return np.argsort(_hilbert_d(order, rows, cols), kind="stable")


def _part1by1(n: np.ndarray, masks: tuple[int, int, int, int]) -> np.ndarray:
    n = (n | (n << 8)) & masks[0]
    n = (n | (n << 4)) & masks[1]
    n = (n | (n << 2)) & masks[2]
    n = (n | (n << 1)) & masks[3]
    return n


_MORTON_MASKS = (0x00FF00FF, 0x0F0F0F0F, 0x33333333, 0x55555555)
# The release indexes its mask table one step off (0x0000FFFF, 0x00FF00FF, 0x0F0F0F0F,
# 0x33333333), so bits of x and y overlap and distinct cells share a code.
_MORTON_MASKS_RELEASE = (0x0000FFFF, 0x00FF00FF, 0x0F0F0F0F, 0x33333333)


def morton_codes(h: int, w: int, release: bool = False) -> np.ndarray:
    """Morton (z-order) code of every cell in row-major order: column bits even, row bits odd."""
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    masks = _MORTON_MASKS_RELEASE if release else _MORTON_MASKS
    return _part1by1(cols, masks) | (_part1by1(rows, masks) << 1)


def _zorder(h: int, w: int) -> np.ndarray:
    return np.argsort(morton_codes(h, w), kind="stable")


def _zorder_release(h: int, w: int) -> np.ndarray:
    # Colliding codes are ordered by raster position (a stable sort). The release sorts with
    # torch.argsort, unstable: its order among equal codes depends on the platform.
    return np.argsort(morton_codes(h, w, release=True), kind="stable")


_BASE = {
    "h": lambda h, w: np.arange(h * w),
    "v": lambda h, w: np.arange(h * w).reshape(h, w).T.reshape(-1),
    "diag": _diag,
    "zigzag": _zigzag,
    "hilbert": _hilbert,
    "zorder": _zorder,
    "zorder_release": _zorder_release,
}


def _view_map(view: str | None, h: int, w: int) -> np.ndarray:
    """Flat index in the original image of each flat position of the transformed image."""
    grid = np.arange(h * w).reshape(h, w)
    if view is None:
        return grid.reshape(-1)
    if view == "mirror":
        return grid[:, ::-1].reshape(-1)
    if view == "vflip":
        return grid[::-1, :].reshape(-1)
    return grid[::-1, ::-1].reshape(-1)  # rot180


@functools.lru_cache(maxsize=512)
def route_order(name: str, height: int, width: int) -> np.ndarray:
    """The permutation (numpy int64, length H*W) of route ``name`` on an H×W grid."""
    if height < 1 or width < 1:
        raise ValueError(f"scan routes need a positive grid size, got {height}x{width}")
    pattern, view, rev = _parse(name)
    perm = _view_map(view, height, width)[_BASE[pattern](height, width)]
    if rev:
        perm = perm[::-1]
    perm = np.ascontiguousarray(perm, dtype=np.int64)
    perm.setflags(write=False)
    return perm


class RouteIndex(NamedTuple):
    """One route set's positions on one grid and device: ``perm`` and ``inverse`` (K, H·W) int64
    (for gather), ``steps`` the same permutations as int32 (for the Triton kernels)."""

    perm: torch.Tensor
    inverse: torch.Tensor
    steps: torch.Tensor


_INDEX_CACHE: dict[tuple, RouteIndex] = {}
_INDEX_CACHE_SIZE = 256  # grids × route sets × devices kept (a resolution ladder visits many)


def route_index(routes: tuple[str, ...], height: int, width: int, device: torch.device | str = "cpu") -> RouteIndex:
    """The cached ``RouteIndex`` of ``routes`` on an H×W grid, on ``device``: the one cache of
    route indices every multi-route scan reads.

    The tensors are built outside inference mode (and without autograd), so an index first
    needed under ``torch.inference_mode()`` can later be saved for a backward pass by any model.
    """
    device = torch.device(device)
    key = (tuple(routes), height, width, device)
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        with torch.inference_mode(False), torch.no_grad():
            perm = torch.from_numpy(np.stack([route_order(r, height, width) for r in routes]))
            inverse = torch.empty_like(perm)
            inverse.scatter_(1, perm, torch.arange(height * width).expand_as(perm).contiguous())
            hit = RouteIndex(perm.to(device), inverse.to(device), perm.to(device=device, dtype=torch.int32))
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = hit
    return hit


def route_indices(
    routes: tuple[str, ...], height: int, width: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked permutations and their inverses, each (k, H*W) int64 (from ``route_index``).

    ``x_route = x.gather(-1, perm)`` reads a (..., k, d, L) tensor along each route;
    ``x.gather(-1, inverse)`` puts a routed tensor back in raster order.
    """
    index = route_index(routes, height, width, device)
    return index.perm, index.inverse
