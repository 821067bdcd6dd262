"""Checkpoint loading: official containers, strict key/shape checks, weights-only safety."""

import os

import pytest
import torch

import harness.models as hm
from harness.checkpoints import CheckpointError, load_weights


@pytest.fixture
def model():
    return hm.create("eamamba_tiny")


def perturbed(sd, value):
    return {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in sd.items()}


def test_eamamba_container_prefers_ema(tmp_path, model):
    sd = model.state_dict()
    ckpt = {"model": {"name": "eamamba", "args": {"dim": 16}, "sd": perturbed(sd, 1.0), "sd_e": perturbed(sd, 2.0)},
            "epoch": 3}
    torch.save(ckpt, tmp_path / "ea.pth")
    info = load_weights(model, tmp_path / "ea.pth")
    assert info["key"] == "model/sd_e"
    assert torch.all(model.output.weight == 2.0)


@pytest.mark.parametrize("container, key", [
    (lambda sd: {"params": sd}, "params"),
    (lambda sd: {"params": perturbed(sd, 0.0), "params_ema": sd}, "params_ema"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, "<root>"),
    (lambda sd: {"state_dict": sd, "optimizer": {"lr": 1e-3}}, "state_dict"),
])
def test_other_containers(tmp_path, model, container, key):
    sd = perturbed(model.state_dict(), 0.5)
    torch.save(container(sd), tmp_path / "c.pth")
    info = load_weights(model, tmp_path / "c.pth")
    assert info["key"] == key and not info["missing"] and not info["unexpected"]
    assert torch.all(model.patch_embed.proj.weight == 0.5)


def test_other_architecture_lists_keys_and_shapes(tmp_path, model):
    torch.save(hm.create("eamamba_tiny", dim=32).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(first: \['patch_embed.proj.weight: checkpoint "
                                              r"\(32, 3, 3, 3\) vs model \(24, 3, 3, 3\)"):
        load_weights(model, tmp_path / "wide.pth")
    torch.save(hm.create("eamamba_sr_tiny").state_dict(), tmp_path / "sr.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(first: \['patch_embed.proj.weight'.*unexpected keys "
                                              r"\(first: \['conv_first.weight'"):
        load_weights(model, tmp_path / "sr.pth")
    info = load_weights(model, tmp_path / "wide.pth", strict=False)
    assert info["shape_mismatch"] and not info["missing"]


class _Payload:
    def __reduce__(self):
        return (os.makedirs, (os.environ["EABENCH_TEST_MARKER"],))


def test_pickled_code_is_refused(tmp_path, model, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EABENCH_TEST_MARKER", str(marker))
    torch.save({"params": model.state_dict(), "hook": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to load.*weights-only"):
        load_weights(model, tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_and_corrupt_files(tmp_path, model):
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_weights(model, tmp_path / "bad.pth")
