"""Cost versus resolution: latency, peak memory and FLOPs of models over a ladder of input sizes.

``resolution_ladder`` measures every (model, size) point and returns one row per point. An
out-of-memory (CUDA OOM, a CPU allocator failure, the memory child killed by the OOM killer, or
a point whose estimated memory exceeds ``memory_cap_mb``) is a row with ``status="oom"``; any
other failure is a row with ``status="error: ..."``; the ladder always goes on. FLOPs are
counted at every size with ``count_flops`` (never extrapolated).

``plot_ladder`` draws one metric on log-log axes (x = pixels per image) with reference slopes
(linear, quadratic) and the hardware/protocol in the caption.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from harness.profile.environment import environment, hardware_caption
from harness.profile.flops import count_flops, count_params
from harness.profile.latency import measure_latency, resolve_model
from harness.profile.memory import is_oom, peak_memory
from harness.models.registry import model_in_channels

MEASURES = ("latency", "memory", "flops")
METRICS = {  # metric -> (column, axis label)
    "latency": ("latency_median_ms", "latency per forward, median (ms)"),
    "memory": ("peak_mem_mb", "peak memory of one forward (MB)"),
    "flops": ("gmacs", "GMACs per forward (fvcore; 1 multiply-add = 1)"),
}
COLUMNS = [
    "model", "family", "params", "height", "width", "pixels", "batch", "in_channels", "device", "precision",
    "status", "latency_median_ms", "latency_p90_ms", "latency_min_ms", "repeats", "peak_mem_mb", "mem_method",
    "gmacs", "gmacs_conv_only", "note",
]


class EstimatedOOM(MemoryError):
    """A point skipped before running because its estimated memory exceeds the cap."""


def _as_items(presets_or_models) -> list[tuple[str, Any]]:
    """Normalise the models argument to [(display name, preset name or module)]."""
    if isinstance(presets_or_models, (str, nn.Module)):
        presets_or_models = [presets_or_models]
    if isinstance(presets_or_models, Mapping):
        return [(str(k), v) for k, v in presets_or_models.items()]
    items = []
    for item in presets_or_models:
        if isinstance(item, str):
            items.append((item, item))
        elif isinstance(item, nn.Module):
            meta = getattr(item, "eabench_meta", None) or {}
            items.append((str(meta.get("preset") or type(item).__name__), item))
        elif isinstance(item, tuple) and len(item) == 2:
            items.append((str(item[0]), item[1]))
        else:
            raise TypeError(f"expected preset names, modules, (name, module) pairs or a dict; got {item!r}")
    return items


def _sizes(sizes: Iterable) -> list[tuple[int, int]]:
    out = []
    for s in sizes:
        h, w = (int(s), int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1]))
        out.append((h, w))
    return out


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo (MB), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def estimate_memory_mb(previous: list[tuple[int, float]], pixels: int) -> float | None:
    """Extrapolate peak memory to ``pixels`` from earlier (pixels, MB) points of the same model.

    The growth exponent is the log-log slope of the last two points, clamped to [1, 2] (linear
    models stay linear; attention may be quadratic); with one point it is 1.
    """
    pts = sorted((p, m) for p, m in previous if m and m > 0 and p > 0)
    if not pts:
        return None
    p1, m1 = pts[-1]
    k = 1.0
    if len(pts) >= 2:
        p0, m0 = pts[-2]
        if p1 > p0:
            k = min(2.0, max(1.0, math.log(m1 / m0) / math.log(p1 / p0)))
    return m1 * (pixels / p1) ** k


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def resolution_ladder(presets_or_models, sizes: Sequence = (64, 128, 256, 512, 1024, 2048), *,
                      device: str | torch.device = "cpu", measure: Sequence[str] = MEASURES, batch_size: int = 1,
                      in_channels: int | None = None, precision: str = "fp32", channels_last: bool = False,
                      compile: bool | str = False, cuda_graphs: bool = False, warmup: int = 10,
                      min_warmup_s: float = 1.0, max_warmup_s: float | None = 30.0, repeats: int = 20,
                      max_time_s: float | None = None, memory_cap_mb: float | str | None = "auto",
                      memory_estimate: Callable[[str, tuple[int, ...]], float | None] | None = None,
                      overrides: dict | None = None, on_row: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """One row per (model, size): latency stats, peak memory, GMACs and a status.

    ``presets_or_models``: preset names, modules, (name, module) pairs, or a {name: module} dict.
    ``sizes``: ints (square) or (height, width) pairs; they are the model's *input* size (the
    low-resolution size for SR presets). ``measure``: any of "latency", "memory", "flops".
    ``memory_cap_mb``: skip (as ``oom``) a point whose estimated memory exceeds it; ``"auto"``
    is 80 % of MemAvailable on CPU and no cap on CUDA (a real CUDA OOM is caught). The estimate
    comes from ``memory_estimate(name, input_shape)`` if given, else from the model's earlier
    measured points (see ``estimate_memory_mb``). ``on_row`` is called with each finished row.
    The frame's ``attrs["environment"]`` holds ``environment(device)``.
    """
    device = torch.device(device)
    unknown = set(measure) - set(MEASURES)
    if unknown:
        raise ValueError(f"unknown measures {sorted(unknown)}; choose from {list(MEASURES)}")
    if memory_cap_mb == "auto":
        avail = available_memory_mb() if device.type == "cpu" else None
        memory_cap_mb = 0.8 * avail if avail else None
    env = environment(device)
    rows: list[dict] = []
    for name, item in _as_items(presets_or_models):
        preset = item if isinstance(item, str) else None
        try:
            model, _ = resolve_model(item, overrides if preset else None)
            model.eval()
            meta = getattr(model, "eabench_meta", None) or {}
            base = {"model": name, "family": meta.get("family"), "params": count_params(model)}
            channels = in_channels or model_in_channels(model)
        except Exception as exc:  # a preset that does not build: one error row per size
            for h, w in _sizes(sizes):
                row = {"model": name, "height": h, "width": w, "pixels": h * w, "device": str(device),
                       "status": f"error: build: {_first_line(exc)}"}
                rows.append(row)
                if on_row:
                    on_row(row)
            continue
        measured_mem: list[tuple[int, float]] = []
        for h, w in _sizes(sizes):
            shape = (int(batch_size), channels, h, w)
            row = dict(base, height=h, width=w, pixels=h * w, batch=int(batch_size), in_channels=channels,
                       device=str(device), precision=precision, status="ok", note="")
            stage = "setup"
            t_start = time.perf_counter()
            try:
                multiple = int(meta.get("pad_multiple") or getattr(model, "pad_multiple", 1) or 1)
                if h % multiple or w % multiple:
                    raise ValueError(f"input {h}x{w} is not a multiple of the model's pad_multiple {multiple}")
                if memory_cap_mb:
                    est = memory_estimate(name, shape) if memory_estimate else estimate_memory_mb(measured_mem, h * w)
                    if est is not None and est > memory_cap_mb:
                        raise EstimatedOOM(f"estimated {est:.0f} MB > cap {memory_cap_mb:.0f} MB (not run)")
                order = ["memory", "latency", "flops"] if device.type == "cpu" else ["latency", "memory", "flops"]
                for stage in [m for m in order if m in measure]:
                    if stage == "memory":
                        target = preset if (preset and device.type == "cpu") else model
                        mem = peak_memory(target, shape, device=device, precision=precision,
                                          channels_last=channels_last,
                                          overrides=overrides if (preset and device.type == "cpu") else None)
                        row["mem_method"] = mem.get("method")
                        if mem.get("status") == "oom":
                            raise MemoryError(mem.get("error", "out of memory"))
                        row["peak_mem_mb"] = mem["peak_mb"]
                        measured_mem.append((h * w, mem["peak_mb"]))
                    elif stage == "latency":
                        lat = measure_latency(model, shape, device=device, precision=precision,
                                              channels_last=channels_last, compile=compile, cuda_graphs=cuda_graphs,
                                              warmup=warmup, min_warmup_s=min_warmup_s, max_warmup_s=max_warmup_s,
                                              repeats=repeats, max_time_s=max_time_s)
                        row.update(latency_median_ms=lat["median_ms"], latency_p90_ms=lat["p90_ms"],
                                   latency_min_ms=lat["min_ms"], repeats=lat["repeats"],
                                   warmup_calls=lat["warmup_calls"], timer=lat["timer"],
                                   scan_backend=lat["scan_backend"], output_shape=lat["output_shape"])
                        if "wall_median_ms" in lat:
                            row["latency_wall_median_ms"] = lat["wall_median_ms"]
                    else:
                        fl = count_flops(model, shape, device=device)
                        row.update(gmacs=fl.gmacs, gmacs_conv_only=fl.conv_only / 1e9,
                                   unsupported_ops=len(fl.unsupported))
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                if is_oom(exc):
                    row["status"] = "oom"
                    row["note"] = f"{stage}: {_first_line(exc)}"
                else:
                    row["status"] = f"error: {stage}: {_first_line(exc)}"
                    row["note"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
            finally:
                _free(device)
            row["seconds"] = time.perf_counter() - t_start
            rows.append(row)
            if on_row:
                on_row(row)
        del model
        _free(device)
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = np.nan if col not in ("status", "note", "model") else ""
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[COLUMNS + extra]
    df["device_name"] = env.get("gpu") if device.type == "cuda" else env["cpu"]
    df["torch"] = env["torch"]
    df["threads"] = torch.get_num_threads()
    df.attrs["environment"] = env
    df.attrs["protocol"] = (f"{precision}, batch {batch_size}, warm-up >= {warmup} calls & >= {min_warmup_s} s "
                            f"(cap {max_warmup_s} s), median of {repeats} timed calls"
                            + (f" (fewer, >= 3, where they exceed {max_time_s} s)" if max_time_s else "")
                            + (", CUDA events" if device.type == "cuda" else ", perf_counter")
                            + (", channels_last" if channels_last else "") + (", torch.compile" if compile else "")
                            + (", CUDA graphs" if cuda_graphs else ""))
    return df


def _fit_slope(px: np.ndarray, val: np.ndarray) -> float | None:
    ok = (px > 0) & (val > 0) & np.isfinite(val)
    if ok.sum() < 2:
        return None
    return float(np.polyfit(np.log(px[ok]), np.log(val[ok]), 1)[0])


def plot_ladder(df: pd.DataFrame, path, metric: str = "latency", *, caption: str | None = None,
                title: str | None = None) -> str:
    """Log-log plot of ``metric`` ("latency" | "memory" | "flops") against pixels; returns the path.

    One line per model (its fitted log-log slope in the legend), OOM points marked with ×
    along the top, dashed reference lines of slope 1 (linear in pixels) and 2 (quadratic), axes
    with units, and a caption naming the hardware, software and protocol.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    column, ylabel = METRICS[metric]
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    ok = df[(df["status"] == "ok") & df[column].notna()] if column in df else df.iloc[0:0]
    ok = ok[ok[column] > 0]
    markers = "osD^v<>p*h"
    anchor = None
    for i, (name, grp) in enumerate(df.groupby("model", sort=False)):
        g = ok[ok["model"] == name].sort_values("pixels")
        if len(g):
            slope = _fit_slope(g["pixels"].to_numpy(float), g[column].to_numpy(float))
            label = f"{name}" + (f" (slope {slope:.2f})" if slope is not None else "")
            line, = ax.plot(g["pixels"], g[column], marker=markers[i % len(markers)], label=label)
            if anchor is None or g["pixels"].iloc[0] < anchor[0]:
                anchor = (float(g["pixels"].iloc[0]), float(g[column].iloc[0]))
            colour = line.get_color()
        else:
            colour = f"C{i % 10}"
        oom = grp[grp["status"] == "oom"]
        if len(oom):
            ax.scatter(oom["pixels"], [1.0] * len(oom), marker="x", s=70, color=colour,
                       transform=ax.get_xaxis_transform(), clip_on=False,
                       label=f"{name}: out of memory")
        err = grp[grp["status"].astype(str).str.startswith("error")]
        if len(err):
            ax.scatter(err["pixels"], [0.0] * len(err), marker="|", s=120, color=colour,
                       transform=ax.get_xaxis_transform(), clip_on=False, label=f"{name}: error")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if anchor is not None and len(ok):
        xs = np.array([ok["pixels"].min(), ok["pixels"].max()], dtype=float)
        if xs[1] > xs[0]:
            for k, style, text in ((1, "--", "reference: ∝ pixels (linear)"),
                                   (2, ":", "reference: ∝ pixels² (quadratic)")):
                ax.plot(xs, anchor[1] * (xs / anchor[0]) ** k, style, color="grey", linewidth=1.2, label=text)
    sizes = sorted(set(zip(df["height"], df["width"], df["pixels"])), key=lambda t: t[2])
    if sizes:
        ax.set_xticks([p for _, _, p in sizes])
        ax.set_xticklabels([f"{h}²" if h == w else f"{h}×{w}" for h, w, _ in sizes], rotation=0)
        ax.minorticks_off()
        ax.set_yscale("log")
    ax.set_xlabel("input size (pixels per image, log scale; tick = side²)")
    ax.set_ylabel(ylabel + ", log scale")
    ax.grid(True, which="major", alpha=0.3)
    device = str(df["device"].dropna().iloc[0]) if "device" in df and df["device"].notna().any() else "cpu"
    env = df.attrs.get("environment") or {}
    if title is None:
        what = {"latency": "Latency", "memory": "Peak memory", "flops": "FLOPs (GMACs)"}[metric]
        title = f"{what} vs resolution on {device}"
        if device.startswith("cuda") and env.get("gpu"):
            title += f" ({env['gpu']})"
    ax.set_title(title)
    if caption is None:
        hw = hardware_caption(env, device) if env else ""
        proto = df.attrs.get("protocol", "")
        if metric == "memory" and "mem_method" in df and df["mem_method"].notna().any():
            proto += "; memory method: " + ", ".join(sorted(set(df["mem_method"].dropna().astype(str))))
        caption = f"Hardware: {hw}\nProtocol: {proto}" if metric != "flops" else (
            f"FLOPs: fvcore count at each size (paper convention, GMACs). Hardware: {hw}")
    ax.legend(fontsize=8, loc="upper left")
    fig.text(0.01, 0.01, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)

