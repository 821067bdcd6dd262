"""Baseline zoo: exact parameter counts, official state-dict layout, padding metadata, training steps.

The listings in fixtures/state_dicts/ were produced from the official code (random init):
``key<TAB>[shape]<TAB>param|buffer`` after one header line. A model whose ``state_dict()``
matches a listing key for key and shape for shape loads that release's checkpoints strictly.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import harness.models as hm
from harness.ops import selective_scan, use_backend

FIXTURES = Path(__file__).parent / "fixtures" / "state_dicts"

# Parameter counts of the official code at random init (issue 4 / baselines.md).
OFFICIAL_PARAMS = {
    "restormer": 26_111_668, "restormer_withbias": 26_126_644,
    "nafnet_sidd_w32": 29_159_715, "nafnet_sidd_w64": 115_982_915,
    "nafnet_gopro_w32": 17_111_907, "nafnet_gopro_w64": 67_888_835,
    "dncnn_gray17": 555_137, "dncnn_color20": 668_227,
    "mambair_colordn": 15_777_507, "mambairunet_realdn": 26_779_480, "swinir_colordn": 11_504_163,
}
# Preset -> listing of the official model (w64 NAFNets: same keys as w32, no listing of their own).
LISTINGS = {
    "restormer": "restormer_biasfree", "restormer_withbias": "restormer_withbias",
    "nafnet_sidd_w32": "nafnet_sidd_w32", "nafnet_gopro_w32": "nafnet_gopro_w32",
    "dncnn_gray17": "dncnn_gray_nb17", "dncnn_color20": "dncnn_color_nb20",
    "mambair_colordn": "mambair_colordn", "mambairunet_realdn": "mambairunet_realdn",
    "swinir_colordn": "swinir_colordn",
}
FAMILIES = ("restormer", "nafnet", "dncnn", "mambair", "mambairunet", "swinir")
TINY = [f"{family}_tiny" for family in FAMILIES]
BASELINES = sorted(OFFICIAL_PARAMS) + TINY
# Scan-based tiny models train at 16x16 here: the portable torch scan backend dominates their time.
TRAIN_SIZE = {"mambair_tiny": 16, "mambairunet_tiny": 16}
META_KEYS = {"family", "input_range", "pad_multiple", "scale", "in_channels", "official_params",
             "official_gflops", "flops_input"}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def read_listing(name):
    """[(key, shape, kind)] in the listing's order; the header's totals as a dict."""
    header, *lines = (FIXTURES / f"{name}.txt").read_text().splitlines()
    rows = []
    for line in lines:
        key, shape, kind = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), kind))
    return header, rows


def test_every_listing_is_a_fixture():
    # The lead's tests use the EAMamba listings from the same folder.
    names = {p.stem for p in FIXTURES.glob("*.txt")}
    assert set(LISTINGS.values()) | {"eamamba", "eamambasr_x4"} <= names


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_preset_matches_release(name):
    """Exact parameter count, and state-dict keys, order, shapes and buffers equal the listing."""
    model = hm.create(name)
    assert n_params(model) == OFFICIAL_PARAMS[name]
    assert model.eabench_meta["official_params"] == OFFICIAL_PARAMS[name]
    listing = LISTINGS.get(name) or LISTINGS[name.replace("w64", "w32")]
    header, rows = read_listing(listing)
    state = model.state_dict()
    if name.endswith("w64"):  # same layout, twice the width
        assert list(state) == [key for key, _, _ in rows]
        return
    assert f"{OFFICIAL_PARAMS[name]} parameters" in header
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(k, s) for k, s, _ in rows]
    params = dict(model.named_parameters())
    assert {k for k, _, kind in rows if kind == "param"} == set(params)
    assert {k for k, _, kind in rows if kind == "buffer"} == set(state) - set(params)
    # Strict loading of an official-layout state dict (here: our own, round-tripped).
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)


@pytest.mark.parametrize("overrides, count", [
    (dict(in_channels=1, out_channels=1, norm_type="BiasFree"), 26_109_076),  # grey denoising
    (dict(in_channels=6, norm_type="WithBias", dual_pixel_task=True), 26_132_548),  # dual-pixel defocus
])
def test_restormer_task_variants(overrides, count):
    assert n_params(hm.create("restormer", **overrides)) == count


def test_dncnn_training_variant_has_batch_norm():
    model = hm.create("dncnn_gray17", act_mode="BR")
    assert n_params(model) == 557_057
    assert n_params(hm.create("dncnn_color20", act_mode="BR")) == 670_531
    assert "model.3.running_mean" in model.state_dict()  # conv 2, BN 3, ReLU 4


def test_mambair_classic_sr_x4_parameter_count():
    model = hm.create("mambair_colordn", img_size=64, mlp_ratio=2.0, upscale=4, upsampler="pixelshuffle")
    assert n_params(model) == 20_569_575


@pytest.mark.parametrize("name", BASELINES)
def test_padding_and_range_metadata(name):
    meta = hm.preset_meta(name)
    assert META_KEYS <= set(meta)
    assert meta["input_range"] == [0, 1]
    assert meta["family"] in FAMILIES and name.startswith(meta["family"])
    assert meta["flops_input"][1] == meta["in_channels"]
    if name in OFFICIAL_PARAMS:
        assert meta["official_params"] == OFFICIAL_PARAMS[name]
    else:
        assert meta["official_params"] is None


@pytest.mark.parametrize("name", TINY + ["dncnn_gray17", "nafnet_sidd_w32"])
def test_pad_multiple_declared_by_model(name):
    """The class/instance attribute the harness pads by agrees with the preset's metadata."""
    model = hm.create(name)
    assert model.pad_multiple == hm.preset_meta(name)["pad_multiple"]
    assert type(model).pad_multiple >= 1


@pytest.mark.parametrize("name", TINY + ["dncnn_gray17", "dncnn_color20",
                                  pytest.param("nafnet_sidd_w32", marks=pytest.mark.slow)])
def test_forward_and_one_training_step(name):
    """Forward at a small size, then one AdamW step: finite loss, finite gradients, weights move."""
    torch.manual_seed(0)
    model = hm.create(name)
    meta = model.eabench_meta
    size = TRAIN_SIZE.get(name, 32)
    batch = 1 if name in OFFICIAL_PARAMS else 2  # full-size models: one image keeps the step cheap
    clean = torch.rand(batch, meta["in_channels"], size, size)
    noisy = clean + 0.1 * torch.randn_like(clean)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with use_backend("torch"):
        out = model(noisy)
        assert out.shape == clean.shape
        loss = F.l1_loss(out, clean)
        loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(torch.isfinite(g).all() for g in grads)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_unets_refuse_unpadded_inputs_and_nafnet_pads_itself():
    with pytest.raises(ValueError, match="divisible by 8"):
        hm.create("restormer_tiny")(torch.rand(1, 3, 20, 20))
    nafnet = hm.create("nafnet_tiny").eval()
    with torch.no_grad():
        assert nafnet(torch.rand(1, 3, 20, 27)).shape == (1, 3, 20, 27)  # zero-padded to 32, cropped back


def test_swinir_pads_to_window_and_recomputes_masks():
    """Other sizes: reflect-pad + crop; the shifted-window mask is recomputed, not the stored one."""
    torch.manual_seed(0)
    small = hm.create("swinir_tiny", img_size=16).eval()
    big = hm.create("swinir_tiny").eval()  # img_size 32: stores the 32x32 masks
    assert small.layers[0].residual_group.blocks[1].attn_mask.shape == (4, 64, 64)
    big.load_state_dict({k: v for k, v in small.state_dict().items() if not k.endswith("attn_mask")}, strict=False)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x))  # small computes the 32x32 masks on the fly
        assert big(torch.rand(1, 3, 30, 21)).shape == (1, 3, 30, 21)


@pytest.mark.parametrize("name", ["restormer_tiny", "swinir_tiny"])
def test_attention_is_explicit_matmuls(name, monkeypatch):
    """No scaled_dot_product_attention: FLOP counters (fvcore) would count it as zero."""
    def forbidden(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention is invisible to fvcore")

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    with torch.no_grad():
        hm.create(name)(torch.rand(1, 3, 32, 32))


def _vmamba_cross_scan_reference(x, ss2d):
    """VMamba's forward_core written out: routes row, column, row-reversed, column-reversed."""
    b, d, h, w = x.shape
    L = h * w
    rows = x.reshape(b, d, L)
    cols = x.transpose(2, 3).reshape(b, d, L)
    xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)  # (B, 4, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, ss2d.x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [ss2d.dt_rank, ss2d.d_state, ss2d.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, ss2d.dt_projs_weight)
    y = selective_scan(
        xs.reshape(b, -1, L), dts.reshape(b, -1, L), -torch.exp(ss2d.A_logs), Bs, Cs, ss2d.Ds,
        delta_bias=ss2d.dt_projs_bias.reshape(-1), delta_softplus=True, backend="torch",
    ).view(b, 4, d, L)
    y_rev = y[:, 2:4].flip(-1)
    col_back = lambda t: t.view(b, d, w, h).transpose(2, 3).reshape(b, d, L)  # noqa: E731
    return y[:, 0] + col_back(y[:, 1]) + y_rev[:, 0] + col_back(y_rev[:, 1])


def test_ss2d_is_vmamba_cross_scan():
    """SS2D's shared multi-route scan equals VMamba's CrossScan/CrossMerge on a non-square map."""
    from harness.models.eamamba import multi_route_scan

    from baselines.mambair import SS2D, SS2D_ROUTES

    torch.manual_seed(0)
    ss2d = SS2D(8, d_state=4, expand=1.5)
    with torch.no_grad():  # distinct per-route parameters, so a route-order mix-up would show
        for p in (ss2d.x_proj_weight, ss2d.dt_projs_weight, ss2d.dt_projs_bias, ss2d.A_logs, ss2d.Ds):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, ss2d.d_inner, 5, 7)
    with torch.no_grad():
        got = multi_route_scan(x, SS2D_ROUTES, "add", ss2d.x_proj_weight, ss2d.dt_projs_weight,
                               ss2d.dt_projs_bias, ss2d.A_logs, ss2d.Ds, backend="torch")
        want = _vmamba_cross_scan_reference(x, ss2d)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_nafnet_tlc_local_pooling():
    from baselines.nafnet import LocalAvgPool2d

    x = torch.randn(1, 2, 9, 12)
    torch.testing.assert_close(LocalAvgPool2d(16)(x), x.mean((-2, -1), keepdim=True))  # window covers the map
    want = F.pad(F.avg_pool2d(x, 4, stride=1), (1, 2, 1, 2), mode="replicate")
    torch.testing.assert_close(LocalAvgPool2d(4)(x), want, rtol=1e-4, atol=1e-5)

    # TLC keeps the weights; up to 1.5x the training size it is the plain NAFNet, beyond it differs.
    plain = hm.create("nafnet_tiny").eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.fill_(1.0)  # zero-initialised scales would hide the attention branch
    tlc = hm.create("nafnet_tiny", tlc_base_size=48, tlc_train_size=32).eval()
    tlc.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        x = torch.rand(1, 3, 48, 48)
        torch.testing.assert_close(tlc(x), plain(x))
        x = torch.rand(1, 3, 64, 64)  # level-0 window 48 < 64: local pooling
        assert not torch.allclose(tlc(x), plain(x), atol=1e-4)
