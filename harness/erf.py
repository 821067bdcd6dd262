"""Effective receptive field (ERF) maps, their RepLKNet area ratios, and figures.

Method (RepLKNet, as adopted by VMamba, MambaIR and EAMamba; ``shared/spec/protocols.md``):
take one output pixel (default the centre), sum its output channels, differentiate with respect
to the input, rectify (``abs``: EAMamba; ``relu``: RepLKNet / MambaIR), sum over input channels,
and average the H×W maps over images, skipping maps that contain NaN (or inf).

Display scaling is a parameter and is written on every figure: ``power0.25`` (EAMamba, MambaIR:
v^0.25 / max), ``power0.2`` (VMamba), ``log10`` (RepLKNet: log10(v + 1) / max), or ``none``
(v / max). ``area_ratios`` quantifies a map: for each threshold t, the smallest square centred
on the target pixel whose sum is at least t of the map's total (after the optional scaling),
reported as the area ratio (side/H)·(side/W).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from harness.models.registry import model_in_channels

SCALINGS = ("power0.25", "power0.2", "log10", "none")
RECTIFIERS = ("abs", "relu")
DEFAULT_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def _to_chw(img) -> torch.Tensor:
    """One image as a float (C, H, W) tensor; numpy HW / HWC (uint8 -> /255) or torch CHW."""
    if isinstance(img, np.ndarray):
        arr = img
        scale = 255.0 if arr.dtype == np.uint8 else (65535.0 if arr.dtype == np.uint16 else 1.0)
        t = torch.from_numpy(np.ascontiguousarray(arr)).float() / scale
        if t.dim() == 2:
            t = t[None]
        elif t.dim() == 3 and t.shape[-1] in (1, 2, 3, 4) and t.shape[0] not in (1, 2, 3, 4):
            t = t.permute(2, 0, 1)
        return t
    t = torch.as_tensor(img).float()
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"each image must be (C, H, W) or (H, W), got shape {tuple(t.shape)}")
    return t


def _iter_images(images) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        yield from images
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        for img in images:
            yield _to_chw(img)
    elif isinstance(images, (torch.Tensor, np.ndarray)):
        yield _to_chw(images)
    else:
        for img in images:
            yield _to_chw(img)


def _centre_crop(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = t.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"image {h}x{w} is smaller than input_size {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return t[..., top:top + th, left:left + tw]


def _adapt_channels(t: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or t.shape[0] == channels:
        return t
    if channels == 1:
        return t[:3].mean(0, keepdim=True)  # grey model, colour image: channel mean
    if t.shape[0] == 1:
        return t.expand(channels, -1, -1)  # colour model, grey image: repeat
    if t.shape[0] > channels:
        return t[:channels]
    raise ValueError(f"model takes {channels} channels, image has {t.shape[0]}")


def _resolve(model, checkpoint, overrides) -> nn.Module:
    if isinstance(model, str):
        from harness.models import create

        model = create(model, **(overrides or {}))
    elif overrides:
        raise ValueError("overrides apply to preset names only")
    if checkpoint is not None:
        from harness.checkpoints import load_weights

        load_weights(model, checkpoint)
    return model


def compute_erf(model: nn.Module | str, images, *, target: tuple[int, int] | None = None,
                rectifier: str = "abs", device: str | torch.device | None = None,
                input_size: int | tuple[int, int] | None = None, batch_size: int = 4,
                checkpoint: str | Path | None = None, overrides: dict | None = None,
                adapt_channels: bool = True, return_info: bool = False):
    """Averaged ERF map (numpy float64, H×W of the model's input) of ``model`` over ``images``.

    ``model``: a module, or a preset name (built with ``overrides``; ``checkpoint`` loads weights
    through ``harness.checkpoints.load_weights`` for either). ``images``: a (N, C, H, W) tensor or
    array, or an iterable of (C, H, W) / (H, W) tensors or (H, W[, C]) arrays (uint8 is /255).
    ``input_size``: centre-crop every image to this size first (EAMamba: 128). ``target``:
    (row, col) in *output* coordinates; default the centre (H_out // 2, W_out // 2).
    ``adapt_channels``: give a grey model the channel mean of colour images and a colour model
    the grey channel repeated. The model runs in eval mode in float32; ``batch_size`` images go
    through at once (their gradients are independent in eval mode). Maps with NaN or inf are
    skipped and counted (a warning says how many). With ``return_info=True`` returns
    ``(map, info)`` where info has n_images, n_used, n_skipped, target, rectifier, input_size.
    """
    if rectifier not in RECTIFIERS:
        raise ValueError(f"rectifier must be one of {list(RECTIFIERS)}, got {rectifier!r}")
    model = _resolve(model, checkpoint, overrides)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    was_training = model.training
    model = model.to(device).eval()
    channels = model_in_channels(model) if adapt_channels else None
    size = None if input_size is None else ((int(input_size),) * 2 if isinstance(input_size, int)
                                             else (int(input_size[0]), int(input_size[1])))
    total = None
    n_images = n_used = 0
    out_target = None
    for p in model.parameters():
        p.requires_grad_(False)  # only the input's gradient is needed
    try:
        batch: list[torch.Tensor] = []

        def flush(batch):
            nonlocal total, n_used, out_target
            x = torch.stack(batch).to(device).requires_grad_(True)
            with torch.enable_grad():
                out = model(x)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                ho, wo = out.shape[-2:]
                r, c = target if target is not None else (ho // 2, wo // 2)
                if not (0 <= r < ho and 0 <= c < wo):
                    raise ValueError(f"target {(r, c)} is outside the {ho}x{wo} output")
                out_target = (int(r), int(c))
                out[:, :, r, c].sum().backward()
            grad = x.grad.detach().double()
            grad = grad.abs() if rectifier == "abs" else grad.clamp_min(0)
            maps = grad.sum(1).cpu().numpy()  # (b, H, W)
            for m in maps:
                if not np.isfinite(m).all():
                    continue
                total = m.copy() if total is None else total + m
                n_used += 1

        for img in _iter_images(images):
            img = _to_chw(img)
            if size is not None:
                img = _centre_crop(img, size)
            if channels is not None:
                img = _adapt_channels(img, channels)
            if batch and img.shape != batch[0].shape:
                raise ValueError(f"all images must have one size after cropping; got {tuple(batch[0].shape)} "
                                 f"and {tuple(img.shape)} (pass input_size)")
            batch.append(img)
            n_images += 1
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    if n_images == 0:
        raise ValueError("compute_erf: no images given")
    skipped = n_images - n_used
    if n_used == 0:
        raise RuntimeError(f"compute_erf: all {n_images} gradient maps contained NaN/inf")
    if skipped:
        warnings.warn(f"compute_erf: skipped {skipped} of {n_images} maps containing NaN/inf", RuntimeWarning)
    erf = total / n_used
    if return_info:
        return erf, {"n_images": n_images, "n_used": n_used, "n_skipped": skipped, "target": out_target,
                     "rectifier": rectifier, "input_size": tuple(erf.shape)}
    return erf


def _scale_raw(erf_map: np.ndarray, scaling: str | None) -> np.ndarray:
    """The scaling transform alone (no normalisation); negative values are clipped to 0."""
    v = np.clip(np.asarray(erf_map, dtype=np.float64), 0, None)
    scaling = "none" if scaling is None else str(scaling)
    if scaling == "none":
        return v
    if scaling == "log10":
        return np.log10(v + 1.0)
    m = re.fullmatch(r"power\s*([0-9]*\.?[0-9]+)", scaling)
    if not m:
        raise ValueError(f"scaling must be one of {list(SCALINGS)} (or 'power<P>'), got {scaling!r}")
    return v ** float(m.group(1))


def scale_for_display(erf_map: np.ndarray, scaling: str | None = "power0.25") -> np.ndarray:
    """Display scaling, normalised to max 1: "powerP" (v^P / max), "log10" (log10(v + 1) / max), "none"."""
    s = _scale_raw(erf_map, scaling)
    top = s.max() if s.size else 0.0
    return s / top if top > 0 else s


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    out[1:, 1:] = a.cumsum(0).cumsum(1)
    return out


def square_sides(erf_map: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 scaling: str | None = None, centre: tuple[int, int] | None = None) -> dict[float, tuple[int, int]]:
    """For each t, the (rows, cols) of the smallest centred square holding >= t of the total.

    Squares have odd side 2r+1 centred on ``centre`` (default (H // 2, W // 2), the default ERF
    target), clipped at the map's edges; r grows until the square covers the whole map.
    """
    a = np.asarray(erf_map, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"erf_map must be 2-D (H, W), got shape {a.shape}")
    if scaling is not None:
        a = scale_for_display(a, scaling)
    h, w = a.shape
    cr, cc = centre if centre is not None else (h // 2, w // 2)
    ii = _integral(a)
    total = ii[-1, -1]
    if not total > 0:
        raise ValueError("erf_map sums to zero (or is not finite): no area ratio")
    r_max = max(cr, h - 1 - cr, cc, w - 1 - cc)
    sums = []
    for r in range(r_max + 1):
        r0, r1, c0, c1 = max(0, cr - r), min(h, cr + r + 1), max(0, cc - r), min(w, cc + r + 1)
        sums.append((ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0], r1 - r0, c1 - c0))
    out = {}
    for t in thresholds:
        need = float(t) * total * (1 - 1e-12)  # ">= t" with round-off slack
        for s, rows, cols in sums:
            if s >= need:
                out[float(t)] = (rows, cols)
                break
        else:
            out[float(t)] = (h, w)
    return out


def area_ratios(erf_map: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                scaling: str | None = None, centre: tuple[int, int] | None = None) -> dict[float, float]:
    """RepLKNet's area ratios {t: (side/H)·(side/W)} of the smallest centred square holding >= t.

    ``scaling`` (e.g. "power0.25") is applied first, as the figures do; None uses the raw map.
    A delta at the centre gives 1/(H·W) for every t; a uniform map gives ~t.
    """
    a = np.asarray(erf_map)
    h, w = a.shape
    return {t: (rows / h) * (cols / w) for t, (rows, cols) in square_sides(a, thresholds, scaling, centre).items()}


def _caption(info: Mapping[str, Any] | None, scaling: str, ratios: Mapping[float, float] | None,
             extra: str | None) -> str:
    parts = [f"display scaling: {scaling}"]
    if info:
        parts.append(f"rectifier {info.get('rectifier')}, target {info.get('target')}, "
                     f"{info.get('n_used')} images ({info.get('n_skipped', 0)} NaN maps skipped)")
    if ratios:
        parts.append("area ratio (raw map) " + ", ".join(f"t={t:g}: {r:.4f}" for t, r in ratios.items()))
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def save_erf(erf_map: np.ndarray, out_dir, name: str, scaling: str = "power0.25", *,
             info: Mapping[str, Any] | None = None, caption: str | None = None,
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS, cmap: str = "viridis") -> dict[str, str]:
    """Write ``<name>.npy`` (the raw averaged map) and ``<name>_<scaling>.png`` (a heatmap).

    The figure's title names the model and the display scaling; its caption gives the protocol
    (rectifier, target, images, skipped maps, when ``info`` from ``compute_erf`` is passed), the
    area ratios of the raw map and ``caption`` (e.g. hardware / checkpoint). Returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = np.asarray(erf_map, dtype=np.float64)
    npy = out_dir / f"{name}.npy"
    np.save(npy, raw)
    try:
        ratios = area_ratios(raw, thresholds)
    except ValueError:
        ratios = None
    shown = scale_for_display(raw, scaling)
    h, w = raw.shape
    fig, ax = plt.subplots(figsize=(5.6, 5.4))
    im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(f"|∂ output / ∂ input|, scaled ({scaling}, / max)")
    ax.set_xlabel("input column (px)")
    ax.set_ylabel("input row (px)")
    ax.set_title(f"ERF: {name}  [scaling {scaling}]")
    fig.text(0.01, 0.01, _caption(info, scaling, ratios, caption), fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(scaling))
    png = out_dir / f"{name}_{safe}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {"npy": str(npy), "png": str(png)}


def erf_grid(maps: Mapping[str, np.ndarray], path, scaling: str = "power0.25", *, normalize: str = "each",
             ncols: int | None = None, caption: str | None = None, cmap: str = "viridis") -> str:
    """Several ERF maps side by side on ONE colour scale (one colour bar), scaling on the figure.

    ``normalize``: ``"each"`` (paper convention: each map's scaled values / its own max, so the
    colours compare shapes) or ``"global"`` (the scaling applied to every map, then divided by
    the largest value over all maps, so the colours also compare magnitudes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("erf_grid: no maps given")
    if normalize not in ("each", "global"):
        raise ValueError(f"normalize must be 'each' or 'global', got {normalize!r}")
    names = list(maps)
    if normalize == "each":
        shown = [scale_for_display(maps[n], scaling) for n in names]
    else:
        shown = [_scale_raw(maps[n], scaling) for n in names]
        top = max(float(s.max()) for s in shown) or 1.0
        shown = [s / top for s in shown]
    n = len(names)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 0.8, 3.6 * nrows + 0.9), squeeze=False)
    im = None
    for ax, name, s in zip(axes.flat, names, shown):
        h, w = s.shape
        im = ax.imshow(s, cmap=cmap, vmin=0.0, vmax=1.0, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        try:
            r = area_ratios(maps[name], (0.2, 0.5, 0.99))
            sub = "  ".join(f"{t:g}: {v:.3g}" for t, v in r.items())
        except ValueError:
            sub = ""
        ax.set_title(f"{name}\narea ratio {sub}", fontsize=8)
        ax.set_xlabel("input column (px)", fontsize=8)
        ax.set_ylabel("input row (px)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Effective receptive fields  [display scaling {scaling}, normalised {normalize}]", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 0.86, 0.95))
    cax = fig.add_axes((0.88, 0.15, 0.015, 0.7))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(f"scaled gradient magnitude ({scaling}, / max)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    text = f"One colour scale for all panels. Display scaling: {scaling}; area ratios of the raw maps."
    if caption:
        text += " " + caption
    fig.text(0.01, 0.01, text, fontsize=7, ha="left", va="bottom", wrap=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
