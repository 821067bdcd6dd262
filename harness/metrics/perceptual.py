"""LPIPS with the ``lpips`` package's v0.1 linear heads and the real ImageNet backbone.

``lpips(pred, gt, net="alex")`` returns one distance per image (lower is better). Inputs are
``(N, C, H, W)`` in [0, 1]; they are clamped to [0, 1] (a restored image is scored as it would be
saved) and passed with ``normalize=True`` (the package maps them to [-1, 1]). Grey inputs are
replicated to three channels.

The model is ``lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True)`` -- heads from
the package's wheel, backbone built empty -- into which the torchvision ImageNet weights from
:func:`~harness.metrics.lpips_weights.backbone_state_dict` are loaded (offline-capable route, see
that module). Reference values (AlexNet, v0.1) on the five Kodak/TID2013 pairs of pyiqa's
``ResultsCalibra``: 0.7237, 0.2572, 0.05079, 0.05205, 0.4253; tests check them to 1e-4.
"""

from __future__ import annotations

import warnings
from importlib import metadata
from typing import Any

import torch

from .lpips_weights import NETS, backbone_state_dict

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}
_SOURCES: dict[str, str] = {}
LPIPS_VERSION = "0.1"


def _package_version() -> str:
    try:
        return metadata.version("lpips")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def build_lpips_model(net: str = "alex") -> torch.nn.Module:
    """A CPU ``lpips.LPIPS`` in eval mode with v0.1 heads and the ImageNet backbone loaded."""
    import lpips as lpips_pkg

    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
    with warnings.catch_warnings():
        # torchvision warns about the deprecated `pretrained=` argument lpips passes.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips_pkg.LPIPS(pretrained=True, net=net, version=LPIPS_VERSION, pnet_rand=True, verbose=False)
    sd, source = backbone_state_dict(net)
    # lpips splits torchvision's `features` into slices but keeps the original indices as module
    # names (`net.slice2.3.weight` is `features.3.weight`), so map by that index.
    own = model.state_dict()
    loaded = 0
    for key in own:
        if not key.startswith("net."):
            continue
        _, _slice, idx, param = key.split(".")
        src = f"features.{idx}.{param}"
        if src not in sd:
            raise KeyError(f"LPIPS {net}: backbone weights lack {src} for {key}")
        if own[key].shape != sd[src].shape:
            raise ValueError(f"LPIPS {net}: {src} has shape {tuple(sd[src].shape)}, model expects "
                             f"{tuple(own[key].shape)}")
        own[key] = sd[src]
        loaded += 1
    if loaded != len(sd):
        raise ValueError(f"LPIPS {net}: loaded {loaded} backbone tensors, weights have {len(sd)}")
    model.load_state_dict(own)
    model.eval().requires_grad_(False)
    _SOURCES[net] = source
    return model


def get_lpips_model(net: str = "alex", device: torch.device | str = "cpu") -> torch.nn.Module:
    """Cached model per (net, device)."""
    key = (net, str(torch.device(device)))
    if key not in _MODELS:
        cpu_key = (net, "cpu")
        if cpu_key not in _MODELS:
            _MODELS[cpu_key] = build_lpips_model(net)
        if key != cpu_key:
            import copy

            _MODELS[key] = copy.deepcopy(_MODELS[cpu_key]).to(device)
    return _MODELS[key]


@torch.no_grad()
def lpips(pred: torch.Tensor, gt: torch.Tensor, *, net: str = "alex") -> torch.Tensor:
    """Per-image LPIPS distance, float64 tensor ``(N,)`` on the inputs' device."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if pred.ndim != 4 or pred.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) with C in (1, 3), got {tuple(pred.shape)}")
    model = get_lpips_model(net, pred.device)
    x = pred.detach().float().clamp(0.0, 1.0)
    y = gt.detach().float().clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    d = model(x, y, normalize=True)
    return d.reshape(d.shape[0]).double()


def lpips_protocol(net: str = "alex") -> dict[str, Any]:
    """The settings an LPIPS number was computed with, stored next to it."""
    if net not in _SOURCES:
        get_lpips_model(net)
    return {
        "metric": "lpips",
        "net": net,
        "version": LPIPS_VERSION,
        "lpips_package": _package_version(),
        "backbone_weights": f"torchvision ImageNet ({_SOURCES[net]})",
        "input": "clamped to [0, 1], normalize=True (scaled to [-1, 1]); grey replicated to RGB",
        "space": "RGB",
        "crop_border": 0,
        "lower_is_better": True,
    }
