"""Training loop: L1/Charbonnier, AdamW, cosine or flat-then-cosine schedule, clipping, EMA,
progressive patches, periodic validation, atomic checkpoints and exact resume, DDP.

Batches are a pure function of (seed, iteration): iteration ``it`` draws its image indices
from a generator seeded by (seed, it) and each patch from (seed, sample id) in
``PatchDataset``. A resumed run therefore sees exactly the batches it would have seen, and
the checkpoint only needs the model, EMA, optimiser, scheduler and iteration.
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from harness.data import PatchDataset, collate_items
from harness.data.sampling import schedule_from_config


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the message says at which iteration."""


@dataclass
class TrainSettings:
    """Budget and optimisation settings (the ``train`` config group)."""

    iters: int = 0
    batch_size: int = 8
    patch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    loss: str = "l1"  # l1 | charbonnier
    schedule: str = "cosine"  # constant | cosine | flat_cosine
    flat_fraction: float = 0.3  # flat_cosine: share of iterations at the initial rate (paper: 138k/450k)
    warmup_iters: int = 0
    eta_min: float = 1e-6
    grad_clip: float | None = None  # max gradient norm (paper: 0.01)
    ema: float = 0.0  # EMA decay; 0 disables (paper: 0.999)
    val_every: int = 0
    ckpt_every: int = 0
    progressive: Mapping[str, Any] | None = None  # {iters: [...], patch_sizes: [...], batch_sizes: [...]}
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    deterministic: bool = False
    repeat: int = 100

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TrainSettings":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown train settings {unknown}; valid: {sorted(known)}")
        values = dict(cfg)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


class EMA:
    """Exponential moving average of a model's parameters and buffers (evaluated instead of it)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def lr_lambda(settings: TrainSettings) -> Callable[[int], float]:
    """Multiplier of the base rate at iteration ``it`` for the configured schedule."""
    total = max(1, settings.iters)
    floor = settings.eta_min / settings.lr if settings.lr > 0 else 0.0

    def cosine(progress: float) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))

    def f(it: int) -> float:
        if settings.warmup_iters and it < settings.warmup_iters:
            return (it + 1) / settings.warmup_iters
        if settings.schedule == "constant":
            return 1.0
        if settings.schedule == "cosine":
            return cosine(it / total)
        if settings.schedule == "flat_cosine":
            flat = int(settings.flat_fraction * total)
            return 1.0 if it < flat else cosine((it - flat) / max(1, total - flat))
        raise ValueError(f"unknown schedule {settings.schedule!r}; valid: constant, cosine, flat_cosine")

    return f


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


LOSSES = {"l1": F.l1_loss, "charbonnier": charbonnier}


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}; valid: fp32, bf16, fp16")
    return torch.autocast(device.type, dtype=dtype)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (a crash mid-write leaves the previous one intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    model: nn.Module,
    train_set: PatchDataset,
    settings: TrainSettings,
    *,
    device: torch.device,
    seed: int = 0,
    run_dir: Path | None = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place; returns {history, iters_done, resumed_from, ema (module or None), time_s}.

    With ``run_dir`` a checkpoint ``run_dir/last.pt`` is written every ``ckpt_every`` iterations
    and at the end, and an existing one is resumed from exactly.
    """
    rank, world = _world()
    if settings.iters < 0 or settings.batch_size < 1 or settings.patch_size < 1:
        raise ValueError(f"train budget must be non-negative with positive batch/patch sizes, got {settings}")
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    loss_fn = LOSSES.get(settings.loss)
    if loss_fn is None:
        raise ValueError(f"unknown loss {settings.loss!r}; valid: {sorted(LOSSES)}")
    model.to(device).train()
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if getattr(p, "_no_weight_decay", False) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    ema = EMA(model, settings.ema) if settings.ema > 0 else None
    # A published progressive schedule is rescaled to this run's budget.
    schedule = schedule_from_config(settings.progressive, settings.patch_size, settings.batch_size,
                                    max(1, settings.iters))
    history: list[dict] = []
    start, resumed_from = 0, None
    ckpt = run_dir / "last.pt" if run_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        start = resumed_from = int(state["iteration"])
        history = list(state.get("history", []))

    def checkpoint(it: int) -> None:
        if ckpt is None or rank != 0:
            return
        save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "ema": ema.module.state_dict() if ema else None,
                               "iteration": it, "history": history})

    n_images = len(train_set.base)
    bar = None
    if progress and rank == 0 and settings.iters > start:
        from tqdm.auto import tqdm
        bar = tqdm(total=settings.iters, initial=start, desc="train", leave=False, mininterval=2.0)
    t0 = time.perf_counter()
    for it in range(start, settings.iters):
        patch, batch = schedule.at(it)
        rng = np.random.Generator(np.random.PCG64([seed, it]))
        images = rng.integers(0, n_images, size=batch)
        ids = [(int(k), patch, it * 4096 + i) for i, k in enumerate(images)][rank::world]
        items = collate_items([train_set[key] for key in ids])
        lq, gt = items["lq"].to(device), items["gt"].to(device)
        with _autocast(settings.precision, device):
            loss = loss_fn(net(lq).float(), gt)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"training loss is {loss.item()} at iteration {it} (lr {scheduler.get_last_lr()[0]:.3g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = None
        if settings.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        entry = {"iter": it + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0], "patch": patch}
        if grad_norm is not None:
            entry["grad_norm"] = grad_norm
        done = it + 1
        # Checkpoint before validation and logging, so an interruption there loses nothing.
        if settings.ckpt_every and done % settings.ckpt_every == 0 and done < settings.iters:
            checkpoint(done)
        if validate is not None and settings.val_every and (done % settings.val_every == 0 or done == settings.iters):
            entry.update({f"val_{k}": v for k, v in validate(ema.module if ema else model).items()})
            model.train()
        if done % max(1, settings.iters // 50) == 0 or "val_psnr" in entry or done == settings.iters:
            history.append(entry)
            if log is not None and rank == 0:
                log(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
    if bar is not None:
        bar.close()
    if settings.iters > start:
        checkpoint(settings.iters)
    out = {"history": history, "iters_done": settings.iters, "resumed_from": resumed_from,
           "ema": ema.module if ema else None, "time_s": time.perf_counter() - t0, "world_size": world}
    if world > 1:
        # Data parallelism is only right if every replica ends with the same weights: check it.
        with torch.no_grad():
            digest = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
            gathered = [torch.empty_like(digest) for _ in range(world)]
            dist.all_gather(gathered, digest)
        out["replicas_identical"] = all(torch.equal(gathered[0], g) for g in gathered[1:])
    return out
