"""Scan routes: the release's orders (spec test vectors), true curves, and route sets."""

import numpy as np
import pytest
import torch

from harness.ops.routes import ROUTE_SETS, morton_codes, resolve_directions, route_indices, route_order

# 3×4 examples of the released heads 0 and 2, as (row, col).
HEAD0 = [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0), (0, 3), (1, 2), (2, 1), (1, 3), (2, 2), (2, 3)]
HEAD2 = [(0, 3), (0, 2), (1, 3), (0, 1), (1, 2), (2, 3), (0, 0), (1, 1), (2, 2), (1, 0), (2, 1), (2, 0)]


def flat(cells, w=4):
    return [r * w + c for r, c in cells]


def test_released_eight_on_3x4():
    h, w = 3, 4
    raster = list(range(12))
    column = [r * w + c for c in range(w) for r in range(h)]
    expected = {
        "diag": flat(HEAD0), "diag_rev": flat(HEAD0)[::-1], "antidiag": flat(HEAD2),
        "antidiag_rev": flat(HEAD2)[::-1], "h": raster, "h_rev": raster[::-1], "v": column, "v_rev": column[::-1],
    }
    assert list(ROUTE_SETS["all_around"]) == list(expected)
    for name, order in expected.items():
        assert route_order(name, h, w).tolist() == order, name


@pytest.mark.parametrize("name", ["diag", "zigzag", "hilbert", "zorder", "zorder_release", "v", "antidiag_rev",
                                  "hilbert_mirror_rev", "zigzag_rot180", "diag_vflip"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (5, 3), (8, 8), (13, 6)])
def test_every_route_is_a_permutation(name, hw):
    order = route_order(name, *hw)
    assert sorted(order.tolist()) == list(range(hw[0] * hw[1]))


def test_inverse_indices_restore_raster_order():
    routes = ROUTE_SETS["all_around_hilbert"]
    perm, inv = route_indices(routes, 6, 10)
    x = torch.randn(2, len(routes), 3, 60)
    routed = x.gather(-1, perm[None, :, None].expand_as(x))
    assert torch.equal(routed.gather(-1, inv[None, :, None].expand_as(x)), x)
    assert route_indices(routes, 6, 10)[0] is perm  # cached per (H, W, device)


def test_zigzag_matches_release_formula():
    # The release: concatenate anti-diagonals of the row-flipped index grid, alternating direction.
    for h, w in [(4, 4), (5, 5), (3, 6), (6, 3)]:
        a = np.arange(h * w).reshape(h, w)
        m = max(h, w)
        release = np.concatenate([np.diagonal(a[::-1, :], k)[:: (2 * (k % 2) - 1)] for k in range(1 - m, m)])
        assert route_order("zigzag", h, w).tolist() == release.tolist()


def test_zorder_is_true_morton_and_release_collides():
    order = route_order("zorder", 4, 4)
    # Z-shaped 2×2 quads: (0,0) (0,1) (1,0) (1,1), then (0,2) (0,3) (1,2) (1,3) ...
    assert order[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert len(set(morton_codes(8, 8).tolist())) == 64
    assert len(set(morton_codes(8, 8, release=True).tolist())) == 52  # the release's collisions


def test_hilbert_matches_independent_implementation():
    hilbert = pytest.importorskip("hilbert")  # numpy-hilbert-curve, what the release called
    for h, w in [(8, 8), (5, 7), (16, 3)]:
        side = 1 << int(np.ceil(np.log2(max(h, w))))
        coords = np.array([[i, j] for i in range(side) for j in range(side)])
        codes = hilbert.encode(coords, 2, int(np.log2(side)))
        sc = coords[np.argsort(codes)]
        keep = sc[(sc[:, 0] < h) & (sc[:, 1] < w)]
        assert route_order("hilbert", h, w).tolist() == (keep[:, 0] * w + keep[:, 1]).tolist()
    # Consecutive cells of a full Hilbert curve are grid neighbours.
    o = route_order("hilbert", 16, 16)
    r, c = np.divmod(o, 16)
    assert (np.abs(np.diff(r)) + np.abs(np.diff(c)) == 1).all()


def test_release_four_route_sets_coincide_for_diag_only():
    assert all(
        np.array_equal(route_order(a, 7, 9), route_order(b, 7, 9))
        for a, b in zip(ROUTE_SETS["diag4"], ROUTE_SETS["diag4_flips"])
    )
    assert not np.array_equal(route_order("hilbert_rev", 8, 8), route_order("hilbert_rot180", 8, 8))


def test_unknown_route_lists_valid_names():
    with pytest.raises(ValueError, match="unknown scan route 'diagonal'.*pattern in"):
        resolve_directions(["h", "diagonal"])
    with pytest.raises(ValueError, match="unknown directions 'spiral'"):
        resolve_directions("spiral")
    assert resolve_directions("cross") == ("h", "h_rev", "v", "v_rev")
    assert resolve_directions(["hilbert", "zorder_rev"]) == ("hilbert", "zorder_rev")


def test_zorder_set_names_say_what_they_run():
    # the release's own z-order ablation: its colliding codes, reversed by flipping the image
    assert resolve_directions("zorder_release4_flips") == (
        "zorder_release", "zorder_release_rot180", "zorder_release_mirror", "zorder_release_vflip")
    assert resolve_directions("zorder4_flips")[0] == "zorder"  # the true Morton curve, the release's flips
    # the old names: unambiguous ones still resolve, the misleading one names both sets
    assert resolve_directions("zigzag4_release") == ROUTE_SETS["zigzag4_flips"]
    assert resolve_directions("zorder_release4_release") == ROUTE_SETS["zorder_release4_flips"]
    assert resolve_directions("all_around_hilbert_release") == ROUTE_SETS["all_around_hilbert_flips"]
    with pytest.raises(ValueError, match="'zorder4_release' was renamed.*'zorder4_flips'.*'zorder_release4_flips'"):
        resolve_directions("zorder4_release")


def test_route_modes_of_the_multi_route_scan():
    from harness.ops import multi_route_scan, route_mode, use_route_mode
    from harness.ops.route_scan import can_fuse

    with pytest.raises(ValueError, match="unknown route mode 'gathered'"):
        with use_route_mode("gathered"):
            pass
    K, d, N, R = 2, 3, 4, 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, K * d, 3, 5, generator=gen)
    params = (torch.randn(K, R + 2 * N, d, generator=gen), torch.randn(K, d, R, generator=gen),
              torch.randn(K, d, generator=gen), torch.randn(K * d, N, generator=gen), torch.randn(K * d, generator=gen))
    auto = multi_route_scan(x, ("h", "v_rev"), "concat", *params, backend="torch")
    with use_route_mode("materialised"):
        assert route_mode() == "materialised"
        assert torch.equal(multi_route_scan(x, ("h", "v_rev"), "concat", *params, backend="torch"), auto)
    assert route_mode() == "auto"
    if not can_fuse(x, "triton"):  # no GPU and no Triton interpreter: the fused mode says so
        with use_route_mode("fused"), pytest.raises(RuntimeError, match="route mode 'fused' needs the triton"):
            multi_route_scan(x, ("h", "v_rev"), "concat", *params)


def test_route_indices_built_under_inference_mode_are_ordinary_tensors():
    from harness.ops.routes import _INDEX_CACHE, route_index

    _INDEX_CACHE.clear()
    with torch.inference_mode():
        index = route_index(("h", "diag"), 3, 4)
    assert not any(t.is_inference() for t in index)
    assert index.steps.dtype == torch.int32 and torch.equal(index.steps.long(), index.perm)
