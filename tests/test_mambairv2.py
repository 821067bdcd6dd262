"""MambaIRv2 / MambaIRv2Light: release layout, exact counts, golden outputs of the release, routing.

The listings in fixtures/state_dicts/mambairv2_*.txt were produced from the official classes
(csguoh/MambaIR ``basicsr/archs/mambairv2_arch.py``, ``mambairv2light_arch.py``, random init).
``fixtures/mambairv2_tiny_golden.pt`` holds an input and the official ``MambaIRv2`` forward on it
in eval mode (see ``fixtures/mambairv2_tiny_golden.md`` for how it was produced).
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import harness.models as hm
from harness.checkpoints import CheckpointError, load_weights
from harness.ops import use_backend
from harness.profile import count_flops

FIXTURES = Path(__file__).parent / "fixtures"
# preset -> (listing, official parameter count, official GMACs at the preset's flops_input)
OFFICIAL = {
    "mambairv2_colordn": ("mambairv2_colordn", 22_657_971, 1767.155),
    "mambairv2_sr_x4": ("mambairv2_srx4", 23_050_713, 113.976),
    "mambairv2_light_sr_x4": ("mambairv2_light_srx4", 789_680, 5.043),
}
# The tiny preset's architecture as the release's constructor takes it (the golden fixture's model).
TINY_RELEASE_ARGS = dict(img_size=32, in_chans=3, embed_dim=24, d_state=4, depths=[2, 2], num_heads=[2, 2],
                         window_size=8, inner_rank=8, num_tokens=16, convffn_kernel_size=5, mlp_ratio=2.0,
                         upscale=1, img_range=1.0, upsampler="", resi_connection="1conv")



@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads wait at barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def read_listing(name):
    """[(key, shape, kind)] in the listing's order, and its header line."""
    header, *lines = (FIXTURES / "state_dicts" / f"{name}.txt").read_text().splitlines()
    rows = []
    for line in lines:
        key, shape, kind = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), kind))
    return header, rows


def seeded_state_dict(model, seed=0):
    """Every float tensor of ``model.state_dict()`` drawn from a seeded generator, in key order.

    Depends only on the keys and shapes (the release's and ours are equal), so both networks get
    the same weights; LayerNorm weights and Ds around 1, everything else around 0, none exactly
    at its init value (a zero skip scale or prompt would hide a branch).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        noise = 0.1 * torch.randn(value.shape, generator=g)
        around_one = key.endswith("Ds") or (value.dim() == 1 and "norm" in key and key.endswith("weight"))
        out[key] = noise + 1.0 if around_one else noise
    return out


def tiny(**overrides):
    model = hm.create("mambairv2_tiny", **overrides)
    model.load_state_dict(seeded_state_dict(model), strict=True)
    return model.eval()


def test_tiny_preset_is_the_golden_architecture():
    cfg = hm.preset_config("mambairv2_tiny")
    assert {k: (list(v) if k in ("depths", "num_heads") else v) for k, v in cfg.items()
            if k in TINY_RELEASE_ARGS} == TINY_RELEASE_ARGS


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_state_dict_and_params_equal_release(name):
    """Keys, order, shapes, the relative_position_index_SA buffer and the exact parameter count."""
    listing, params, _ = OFFICIAL[name]
    with torch.device("meta"):  # shapes only: no allocation, no init
        model = hm.create(name)
    header, rows = read_listing(listing)
    assert f"{params} parameters" in header
    assert sum(p.numel() for p in model.parameters()) == params == model.eabench_meta["official_params"]
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(k, s) for k, s, _ in rows]
    assert {k for k, _, kind in rows if kind == "buffer"} == set(state) - set(dict(model.named_parameters()))


def test_relative_position_index_values():
    model = hm.create("mambairv2_tiny")
    rpi = model.relative_position_index_SA  # (64, 64) for window 8
    ws = 8
    q, k = 9, 2  # window positions (1, 1) and (0, 2): offset (1, -1) -> row 1 + 7, column -1 + 7
    assert rpi.shape == (ws * ws, ws * ws) and rpi.dtype == torch.int64
    assert rpi[q, k] == (1 + ws - 1) * (2 * ws - 1) + (-1 + ws - 1)
    assert rpi.diagonal().unique().tolist() == [(ws - 1) * (2 * ws - 1) + ws - 1]


def test_light_gmacs_equal_release():
    """Counted at 16x16 and 32x32 LR and extrapolated to the 64x64 input. The count is affine in
    pixels: per-pixel and per-16x16-window costs, plus one constant per layer (its prompt table,
    embeddingB @ embeddingA: num_tokens·inner_rank·d_state MACs), so two sizes fix it exactly and
    the trace stays small."""
    model = hm.create("mambairv2_light_sr_x4")
    assert model.eabench_meta["flops_input"] == [1, 3, 64, 64]
    small, large = (count_flops(model, [1, 3, s, s]).total for s in (16, 32))
    per_pixel = (large - small) / (32 ** 2 - 16 ** 2)
    constant = small - per_pixel * 16 ** 2
    assert constant == pytest.approx(20 * 64 * 32 * 8, rel=0.05)  # 20 layers' prompt tables
    gmacs = (constant + per_pixel * 64 ** 2) / 1e9
    official = OFFICIAL["mambairv2_light_sr_x4"][2]
    assert model.eabench_meta["official_gflops"] == official
    assert abs(gmacs - official) <= 3e-4 * official  # 0.03 %, as the other presets; printed to 3 decimals


def test_golden_output_of_release():
    """Same weights, input and seed: the release's eval forward, Gumbel draws included."""
    golden = torch.load(FIXTURES / "mambairv2_tiny_golden.pt", weights_only=True)
    model = tiny()
    with torch.no_grad():
        torch.manual_seed(golden["seed"])
        out = model(golden["input"])
    assert out.shape == golden["output"].shape == (2, 3, 20, 27)
    torch.testing.assert_close(out, golden["output"], rtol=1e-4, atol=1e-5)


def test_eval_routing_noise_and_determinism():
    """The release samples routes in eval: seeds change outputs. routing_noise=False is deterministic."""
    x = torch.rand(1, 3, 16, 16)
    noisy = tiny()
    with torch.no_grad():
        torch.manual_seed(1)
        a = noisy(x)
        torch.manual_seed(1)
        b = noisy(x)
        c = noisy(x)  # the generator has moved on
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-6)
    fixed = tiny(routing_noise=False, stable_sort=True)
    with torch.no_grad():
        rng = torch.get_rng_state()
        d = fixed(x)
        assert torch.equal(torch.get_rng_state(), rng)  # no random draw at all
        torch.manual_seed(123)
        assert torch.equal(fixed(x), d)


def test_stable_sort_orders_ties_by_position():
    """With one token class, the stable sort is the identity: the scan runs in raster order."""
    model = tiny(routing_noise=False, stable_sort=True)
    assm = model.layers[0].residual_group.layers[0].assm
    with torch.no_grad():
        assm.route[2].weight.zero_()
        assm.route[2].bias.copy_(torch.arange(assm.num_tokens, dtype=torch.float32))  # class T-1 always wins
        tokens = torch.randn(1, 64, 24)
        got = assm(tokens, (8, 8), model.layers[0].residual_group.layers[0].embeddingA.weight)
        # Raster-order reference: the prompt is the last class's for every token.
        x = assm.in_proj(tokens.transpose(1, 2).reshape(1, 24, 8, 8))
        x = (x * torch.sigmoid(assm.CPE(x))).flatten(2).transpose(1, 2)
        prompt = (assm.embeddingB.weight[-1] @ model.layers[0].residual_group.layers[0].embeddingA.weight)
        want = assm.out_proj(assm.out_norm(assm.selectiveScan(x, prompt.expand(1, 64, -1))))
    torch.testing.assert_close(got, want)


def test_scan_backends_agree():
    """The fast CPU path and the sequential definition of the scan give the same network output
    (the scan runs in fp32 whatever the model's dtype, as released, so both are fp32)."""
    model = tiny(routing_noise=False, stable_sort=True)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        with use_backend("reference"):
            ref = model(x)
        fast = model(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, size, out", [("mambairv2_tiny", 20, 20),
                                             ("mambairv2_tiny", 8, 8)])
def test_forward_backward(name, size, out):
    """One training step (routes sampled, straight-through gradients) reaches every parameter."""
    model = hm.create(name)
    x = torch.rand(2, 3, size, size)
    with use_backend("torch"):
        y = model(x)
        assert y.shape == (2, 3, out, out)
        F.l1_loss(y, x).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    route = model.layers[0].residual_group.layers[0].assm.route[0].weight.grad
    assert route.abs().sum() > 0  # the router learns through the straight-through estimator


def test_light_model_shapes_and_ffn():
    model = hm.create("mambairv2_light_sr_x4", depths=[1], num_heads=[4]).eval()
    layer = model.layers[0].residual_group.layers[0]
    assert type(layer.convffn1).__name__ == "GatedMLP"
    with torch.no_grad():
        assert model(torch.rand(1, 3, 10, 13)).shape == (1, 3, 40, 52)


def test_basicsr_checkpoint_loads_strictly(tmp_path):
    """BasicSR containers (``params``, ``params_ema``) load strictly; a missing buffer is named."""
    source = hm.create("mambairv2_tiny").state_dict()
    path = tmp_path / "mambairv2.pth"
    for container in ("params", "params_ema"):
        torch.save({container: source}, path)
        target = hm.create("mambairv2_tiny")
        assert load_weights(target, path, strict=True)["key"] == container
        assert all(torch.equal(v, source[k]) for k, v in target.state_dict().items())
    torch.save({"params": {k: v for k, v in source.items() if k != "relative_position_index_SA"}}, path)
    with pytest.raises(CheckpointError, match="relative_position_index_SA"):
        load_weights(hm.create("mambairv2_tiny"), path, strict=True)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=[2]), "one entry per group"),
    (dict(num_heads=[5, 5]), "must divide"),
    (dict(ffn="mlp"), "unknown ffn"),
    (dict(window_size=7), "window_size must be even"),
    (dict(upsampler="nearest+conv"), "unknown upsampler"),
])
def test_bad_configuration_names_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        hm.create("mambairv2_tiny", **overrides)


def test_tiny_input_smaller_than_padding_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than the padding"):
        hm.create("mambairv2_tiny")(torch.rand(1, 3, 3, 3))
