"""EAMamba family: exact parameter counts, official state-dict layout, backends, variants, errors."""

from pathlib import Path

import pytest
import torch

import harness.models as hm
from harness.ops import scan_backends, use_backend

FIXTURES = Path(__file__).parent / "fixtures" / "state_dicts"

OFFICIAL_PARAMS = {
    "eamamba": 25_320_512, "eamamba_add4": 27_802_688, "eamamba_add8": 31_112_256,
    "eamamba_gdfn": 34_450_496, "eamamba_ffn": 28_253_248, "eamamba_cca": 28_336_192,
    "eamamba_sr_x2": 725_056, "eamamba_sr_x3": 909_696, "eamamba_sr_x4": 872_768,
}
EAMAMBA_PRESETS = [n for n in hm.available() if n.startswith("eamamba")]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def read_listing(name):
    lines = (FIXTURES / name).read_text().splitlines()[1:]
    return [(key, shape) for key, shape, _ in (line.split("\t") for line in lines)]


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_parameter_counts(name):
    model = hm.create(name)
    assert n_params(model) == OFFICIAL_PARAMS[name]
    assert model.eabench_meta["official_params"] == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("d_state, count", [(8, 25_099_328), (32, 25_762_880)])
def test_d_state_variants(d_state, count):
    assert n_params(hm.create("eamamba", d_state=d_state)) == count


@pytest.mark.parametrize("k", ["raster", "bidirectional", "cross"])
def test_concat_parameter_count_is_independent_of_route_count_when_heads_fixed(k):
    # k 4 / 2 / 1 with concatenation keep the released 8 heads' shapes: 25,320,512 parameters.
    assert n_params(hm.create("eamamba", directions=k, heads=8)) == 25_320_512


@pytest.mark.parametrize("preset, listing", [("eamamba", "eamamba.txt"), ("eamamba_sr_x4", "eamambasr_x4.txt")])
def test_state_dict_matches_official_listing(preset, listing):
    ours = [(k, str(list(v.shape))) for k, v in hm.create(preset).state_dict().items()]
    assert ours == read_listing(listing)


def test_every_backend_gives_the_same_model_output():
    model = hm.create("eamamba").eval()
    x = torch.rand(1, 3, 16, 16)
    outputs = {}
    with torch.no_grad():
        for backend in [b for b in scan_backends() if b != "mamba_ssm"]:
            with use_backend(backend):
                outputs[backend] = model(x)
    ref = outputs.pop("reference")
    for backend, out in outputs.items():
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, (backend, rel)


@pytest.mark.parametrize("overrides", [
    dict(directions="all_around", heads=16, dim=16),
    dict(directions="cross", merge="add"),
    dict(directions=["hilbert", "hilbert_rev", "zigzag", "zorder_release"], heads=4),
    dict(directions="raster", heads=1),
    dict(mixer="gdfn"), dict(mixer="ffn"), dict(mixer="cca"),
    dict(expand=2, d_state=4), dict(conv_2d=False), dict(use_z=False),
])
def test_variants_forward_backward(overrides):
    model = hm.create("eamamba_tiny", **overrides)
    x = torch.rand(2, 3, 16, 24)
    out = model(x)
    assert out.shape == x.shape
    out.abs().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder_level1[0].mamba.A_logs.grad is not None


def test_sr_shapes():
    for scale in (2, 3, 4):
        model = hm.create("eamamba_sr_x%d" % scale, dim=16, depths=[1])
        assert model(torch.rand(1, 3, 10, 7)).shape == (1, 3, 10 * scale, 7 * scale)


def test_concat_heads_read_their_own_routes():
    # With two routes and concat, channel group 0 must be unaffected by what route 1 sees:
    # swapping route 1 for another leaves group 0's scan output unchanged.
    from harness.models.eamamba import MHSSM
    from harness.ops import multi_route_scan
    m = MHSSM(16, directions=["h", "v"], d_state=4)
    x = torch.randn(1, 16, 5, 6)
    args = (m.x_proj_weight, m.dt_projs_weight, m.dt_projs_bias, m.A_logs, m.Ds, "torch")
    a = multi_route_scan(x, ("h", "v"), "concat", *args)
    b = multi_route_scan(x, ("h", "diag"), "concat", *args)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("overrides, message", [
    (dict(directions=["h", "spiral"]), "unknown scan route 'spiral'"),
    (dict(directions="all_around", heads=12), r"heads \(12\) must be a positive multiple of the number of routes \(8\)"),
    (dict(directions="all_around", heads=32), r"heads \(32\) must divide the inner channels"),
    (dict(merge="mean"), "unknown merge 'mean'"),
    (dict(mixer="mlp"), "unknown channel mixer 'mlp'"),
    (dict(d_state=0), "d_state must be >= 1"),
    (dict(merge="add", heads=16), "heads must equal the number of routes"),
    (dict(num_blocks=[1, 1, 1]), "num_blocks must be 4"),
    (dict(widht=3), "has no option 'widht'"),
])
def test_bad_configuration_names_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        hm.create("eamamba_tiny", **overrides)


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match=r"unknown model preset 'eamamba_huge'.*eamamba_tiny"):
        hm.create("eamamba_huge")


def test_input_not_multiple_of_eight_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 8"):
        hm.create("eamamba_tiny")(torch.rand(1, 3, 20, 16))


@pytest.mark.parametrize("name", EAMAMBA_PRESETS)
def test_preset_meta_is_queryable(name):
    meta = hm.preset_meta(name)
    assert meta["family"].startswith("eamamba") and meta["input_range"] == [0, 1]
    assert meta["pad_multiple"] in (1, 8) and meta["scale"] in (1, 2, 3, 4)


@pytest.mark.parametrize("batch,bias", [(1, False), (2, True)])
def test_pointwise_products_equal_the_mixer_convolutions(batch, bias):
    """The mixers' GPU path (W·x on the (C, H·W) view, one product per SimpleGate half) gives
    the 1×1 convolutions' output and gradients."""
    import harness.models.layers as layers

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, kernel_size=1, bias=bias).double()
    x = torch.randn(batch, 6, 5, 7, dtype=torch.float64)
    assert torch.allclose(layers.pointwise_product(conv.weight.flatten(1), conv.bias, x), conv(x), rtol=1e-12, atol=1e-12)
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(batch, 4, 5, dtype=torch.float64)
    assert torch.allclose(layers.batched_mm(a, b), a @ b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layers.batched_mm(b.transpose(1, 2), a.t()), b.transpose(1, 2) @ a.t(), rtol=1e-12, atol=1e-12)

    mixer = layers.SimpleGateFFN(6, 2.0, bias=bias).double()
    x.requires_grad_(True)
    grads = []
    for forward in (mixer.forward, mixer.forward_fast):  # batch 2 with gradients: two convolutions; 1: products
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        out = forward(x)
        out.square().sum().backward()
        grads.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in mixer.parameters()])
    for conv_value, product_value in zip(*grads):
        assert torch.allclose(conv_value, product_value, rtol=1e-10, atol=1e-12)


def test_fast_paths_are_chosen_at_construction():
    """``fast_paths(False)`` builds every specialised module on its reference path; a CPU input
    takes the reference path either way; the Upsample fast path gives the reference's values."""
    import harness.models.layers as layers

    with layers.fast_paths(False):
        model = hm.create("eamamba_tiny")
    flags = [m.fast_path for m in model.modules() if hasattr(m, "fast_path")]
    assert flags and not any(flags)
    assert all(m.fast_path for m in hm.create("eamamba_tiny").modules() if hasattr(m, "fast_path"))
    up = layers.Upsample(4).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    assert torch.equal(up.forward_fast(x), up(x))


def _train_step(model, x):
    model.train()
    loss = model(x).abs().mean()
    loss.backward()
    return loss


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_training_after_inference_mode_at_the_same_size(backend):
    """Route indices first built under torch.inference_mode() are shared by every model: a new
    model trained at that size, and the same model back in training, must both work."""
    from harness.ops.routes import _INDEX_CACHE

    _INDEX_CACHE.clear()
    x = torch.rand(1, 3, 8, 16)
    with use_backend(backend):
        first = hm.create("eamamba_tiny", dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1).eval()
        with torch.inference_mode():
            first(x)
        fresh = hm.create("eamamba_tiny", dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
        _train_step(fresh, x)
        _train_step(first, x)
    assert fresh.encoder_level1[0].mamba.A_logs.grad is not None
    assert first.encoder_level1[0].mamba.A_logs.grad is not None


def _per_route_oracle(x, head_routes, merge, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """multi_route_scan written route by route with the sequential reference scan, in x's dtype."""
    from harness.ops.routes import route_order
    from harness.ops.scan_reference import selective_scan_reference

    b, D, h, w = x.shape
    K, _, d = x_proj_weight.shape
    R, N = dt_projs_weight.shape[-1], A_logs.shape[-1]
    out = torch.zeros(b, D, h * w, dtype=x.dtype)
    for k, route in enumerate(head_routes):
        perm = torch.from_numpy(route_order(route, h, w).copy())
        chans = slice(k * d, (k + 1) * d) if merge == "concat" else slice(None)
        u = x.reshape(b, D, h * w)[:, chans][..., perm]  # (b, d, L) in route order
        proj = torch.einsum("bdl,cd->bcl", u, x_proj_weight[k])
        dt = torch.einsum("brl,dr->bdl", proj[:, :R], dt_projs_weight[k])
        y = selective_scan_reference(u, dt, -torch.exp(A_logs[k * d:(k + 1) * d]), proj[:, None, R:R + N],
                                     proj[:, None, R + N:], Ds[k * d:(k + 1) * d], dt_projs_bias[k], True)
        out[:, chans, perm] += y
    return out


@pytest.mark.parametrize("directions, merge, heads", [("all_around", "concat", 8), ("cross", "add", 4)])
def test_float64_scan_matches_a_float64_oracle(directions, merge, heads):
    """Float64 all the way through: A_logs, Ds and dt_projs_bias keep the model's dtype (a
    float32 cast anywhere shows as ~1e-8 here), on every CPU backend."""
    from harness.models.eamamba import MHSSM
    from harness.ops import multi_route_scan

    m = MHSSM(16, d_state=4, directions=directions, merge=merge, heads=heads).double()
    with torch.no_grad():
        m.A_logs.add_(0.1 * torch.randn_like(m.A_logs))  # decay rates that float32 cannot hold exactly
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    params = (m.x_proj_weight, m.dt_projs_weight, m.dt_projs_bias, m.A_logs, m.Ds)
    with torch.no_grad():
        ref = _per_route_oracle(x, m.head_routes, merge, *params)
        for backend in [b for b in scan_backends() if b != "mamba_ssm"]:
            ours = multi_route_scan(x, m.head_routes, merge, *params, backend=backend)
            assert ours.dtype == torch.float64
            assert ((ours - ref).norm() / ref.norm()).item() <= 1e-12, backend


def test_float64_model_is_float64_through_the_scan():
    """The whole model in float64 on the chunked torch backend matches the sequential reference."""
    model = hm.create("eamamba_tiny", dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1).double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        with use_backend("reference"):
            ref = model(x)
        with use_backend("torch"):
            ours = model(x)
    assert ours.dtype == torch.float64
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-12
