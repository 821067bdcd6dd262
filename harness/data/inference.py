"""Evaluation-time helpers: pad to the model's multiple, tiled inference, self-ensemble.

All functions take ``(N, C, H, W)`` tensors and a ``model`` callable mapping an LQ batch to an
output batch ``scale`` times larger.

* :func:`pad_to_multiple` / :func:`crop_output` -- reflect-pad bottom/right so H and W are
  multiples of ``multiple`` (as Restormer/EAMamba test scripts do), then crop the output back.
* :func:`tiled_forward` -- overlapping tiles for images too large for memory; tile outputs are
  blended with uniform weights (``"mean"``, SwinIR/KAIR style) or a smooth window that falls
  towards tile edges (``"gaussian"``), which hides seams where tiles disagree.
* :func:`self_ensemble` -- average over the 8 dihedral transforms (``"x8"``, EDSR/SwinIR) or over
  the 4 flips (``"flip4"``, EAMamba's ``--ensemble``).
* :func:`restore` -- all of the above composed, the one call an evaluation loop needs.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


def reflect_pad_tensor(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad ``(N, C, H, W)`` at the bottom/right; pads larger than the image are done in
    several reflections (torch's 'reflect' needs pad < size), 1-px sides fall back to replicate."""
    while pad_h > 0 or pad_w > 0:
        h, w = x.shape[-2:]
        ph, pw = min(pad_h, h - 1), min(pad_w, w - 1)
        if ph <= 0 and pw <= 0:
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)), mode="reflect")
        pad_h, pad_w = pad_h - max(ph, 0), pad_w - max(pw, 0)
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad so H and W are multiples of ``multiple``; returns (padded, original (H, W))."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return reflect_pad_tensor(x, ph, pw), (h, w)


def crop_output(y: torch.Tensor, size: tuple[int, int], scale: int = 1) -> torch.Tensor:
    """Crop a model output back to ``scale * size``."""
    return y[..., : size[0] * scale, : size[1] * scale]


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # last tile flush with the border
    return starts


def blend_window(size: int, overlap: int, kind: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """1-D blending weights for a tile: ones (``"mean"``) or a raised-cosine ramp over the
    ``overlap`` pixels at each end (``"gaussian"``; floor 1e-3 so borders keep some weight)."""
    w = torch.ones(size, device=device, dtype=dtype)
    if kind == "mean" or overlap <= 0:
        return w
    if kind != "gaussian":
        raise ValueError(f"blend must be 'mean' or 'gaussian', got {kind!r}")
    n = min(overlap, size // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(n, device=device, dtype=dtype) + 0.5) / n)
        w[:n] = ramp
        w[size - n:] = ramp.flip(0)
    return w.clamp_min(1e-3)


@torch.no_grad()
def tiled_forward(model: Model, x: torch.Tensor, tile: int, overlap: int = 32, scale: int = 1,
                  multiple: int = 1, blend: str = "mean") -> torch.Tensor:
    """Run ``model`` over overlapping ``tile x tile`` windows of ``x`` and blend the outputs.

    ``tile`` must be a multiple of ``multiple``; images smaller than a tile run in one pass (after
    padding to ``multiple``). Tiles are taken from the image padded to ``multiple`` and the blend
    weights are accumulated, so every output pixel is a weighted mean of the tiles covering it.
    """
    if tile % multiple:
        raise ValueError(f"tile {tile} must be a multiple of the model multiple {multiple}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    xp, (h, w) = pad_to_multiple(x, multiple)
    H, W = xp.shape[-2:]
    if H <= tile and W <= tile:
        return crop_output(model(xp), (h, w), scale)
    th, tw = min(tile, H), min(tile, W)
    stride = tile - overlap
    out = None
    weight = None
    for top, left in itertools.product(_tile_starts(H, th, stride), _tile_starts(W, tw, stride)):
        y = model(xp[..., top: top + th, left: left + tw])
        if out is None:
            out = y.new_zeros(y.shape[0], y.shape[1], H * scale, W * scale)
            weight = y.new_zeros(1, 1, H * scale, W * scale)
        wh = blend_window(th * scale, overlap * scale, blend, y.device, y.dtype)
        ww = blend_window(tw * scale, overlap * scale, blend, y.device, y.dtype)
        win = (wh[:, None] * ww[None, :])[None, None]
        ts, ls = top * scale, left * scale
        out[..., ts: ts + th * scale, ls: ls + tw * scale] += y * win
        weight[..., ts: ts + th * scale, ls: ls + tw * scale] += win
    return crop_output(out / weight, (h, w), scale)


_FLIP4 = ((), (-1,), (-2,), (-2, -1))


@torch.no_grad()
def self_ensemble(model: Model, x: torch.Tensor, mode: str = "x8") -> torch.Tensor:
    """Average ``model`` over input transforms, each output mapped back.

    ``"x8"``: the 8 dihedral transforms (rotations by 90 degrees x horizontal flip);
    ``"flip4"``: identity, horizontal, vertical and both flips (EAMamba's ensemble).
    """
    outs = []
    if mode == "x8":
        for k in range(8):
            t = torch.rot90(x, k & 3, dims=(-2, -1))
            t = t.flip(-1) if k >= 4 else t
            y = model(t)
            y = y.flip(-1) if k >= 4 else y
            outs.append(torch.rot90(y, -(k & 3), dims=(-2, -1)))
    elif mode == "flip4":
        for dims in _FLIP4:
            y = model(x.flip(dims) if dims else x)
            outs.append(y.flip(dims) if dims else y)
    else:
        raise ValueError(f"self-ensemble mode must be 'x8' or 'flip4', got {mode!r}")
    return torch.stack(outs).mean(0)


@torch.no_grad()
def restore(model: Model, x: torch.Tensor, *, multiple: int = 1, scale: int = 1, tile: int | None = None,
            overlap: int = 32, blend: str = "mean", ensemble: str | None = None) -> torch.Tensor:
    """Full-image inference: optional self-ensemble around optional tiling around padding.

    Returns an output of exactly ``scale * (H, W)`` (not clipped; metrics clip as their protocol
    says).
    """
    def run(t: torch.Tensor) -> torch.Tensor:
        if tile is not None:
            return tiled_forward(model, t, tile, overlap, scale, multiple, blend)
        tp, size = pad_to_multiple(t, multiple)
        return crop_output(model(tp), size, scale)

    if ensemble:
        return self_ensemble(run, x, ensemble)
    return run(x)


def describe_inference(*, multiple: int = 1, scale: int = 1, tile: int | None = None, overlap: int = 32,
                       blend: str = "mean", ensemble: str | None = None) -> dict:
    """Record of the inference settings, stored next to results."""
    return {"pad": "reflect bottom/right", "multiple": multiple, "scale": scale, "tile": tile,
            "overlap": overlap if tile else None, "blend": blend if tile else None, "ensemble": ensemble}
