"""The training loop for autoencoders on embedding vectors, kept apart from the networks."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from anomaly3d_core.model import distributed
from anomaly3d_core.progress import progress

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float]], None]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        from anomaly3d_core.errors import ConfigError

        raise ConfigError(
            f"training.device: '{device}' is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        from anomaly3d_core.errors import ConfigError

        raise ConfigError(
            f"training.device: '{device}' requested but CUDA is not available here; use auto or cpu"
        )
    return dev


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(params: Any, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    opt: torch.optim.Optimizer, name: str, num_epochs: int, step_size: int = 10, gamma: float = 0.5
) -> Any:
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, num_epochs))
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=gamma, patience=max(1, step_size // 3))
    return None


def _evaluate(
    model: nn.Module, data: torch.Tensor, batch_size: int, device: torch.device, amp: bool
) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in data.split(batch_size * 4):
            x = chunk.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=amp):
                loss, _ = model.loss(x, model(x))
            total += float(loss) * len(x)
            count += len(x)
    return total / max(count, 1)


def train_autoencoder(
    autoencoder: nn.Module,
    train_features: torch.Tensor,
    val_features: torch.Tensor | None = None,
    *,
    num_epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    scheduler_type: str = "cosine",
    step_size: int = 10,
    gamma: float = 0.5,
    grad_clip: float | None = 1.0,
    early_stopping_patience: int = 8,
    use_amp: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    show_progress: bool | None = None,
) -> dict[str, list[float]]:
    """Train ``autoencoder`` on vectors ``(N, D)``; returns the per-epoch history.

    Early stopping watches the validation loss (held-out normal data) and the best weights are
    restored at the end. With ``checkpoint_dir``, ``last.pt`` and ``best.pt`` are written each
    epoch and ``resume=True`` continues from ``last.pt``. ``use_amp`` runs CUDA autocast with a
    gradient scaler; it is ignored on the CPU.
    """
    dev = distributed.local_device() or resolve_device(device)
    gen = seed_everything(seed)
    amp = bool(use_amp and dev.type == "cuda")
    if use_amp and not amp:
        log.info("use_amp ignored: mixed precision needs CUDA, running on %s", dev)
    model = autoencoder.to(dev)
    rank, world = distributed.rank(), distributed.world_size()
    # Under torchrun, DDP broadcasts rank 0's weights and averages gradients; `forward` goes through it.
    forward = (
        DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if world > 1
        else model
    )
    ckpt_writer = distributed.is_main()
    opt = make_optimizer(model.parameters(), optimizer, learning_rate, weight_decay)
    sched = make_scheduler(opt, scheduler_type, num_epochs, step_size, gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "lr": []}
    best, best_state, bad_epochs, start = float("inf"), None, 0, 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt and resume and (ckpt / "last.pt").is_file():
        state = torch.load(ckpt / "last.pt", map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        history, best, bad_epochs, start = (
            state["history"],
            state["best"],
            state["bad_epochs"],
            state["epoch"] + 1,
        )
        best_state = (
            torch.load(ckpt / "best.pt", map_location="cpu", weights_only=True)
            if (ckpt / "best.pt").is_file()
            else None
        )
        gen.set_state(state["generator"])
    val = val_features if val_features is not None and len(val_features) else train_features
    bar = progress(range(start, num_epochs), desc="training", total=num_epochs - start, enabled=show_progress)
    for epoch in bar:
        model.train()
        running, seen = 0.0, 0
        order = torch.randperm(len(train_features), generator=gen)  # the same on every rank
        if world > 1:  # equal shards, so every rank runs the same number of steps
            order = order[: len(order) // world * world][rank::world]
        for idx in order.split(batch_size):
            x = train_features[idx].to(dev, non_blocking=True)
            with torch.autocast(dev.type, enabled=amp):
                loss, _ = model.loss(x, forward(model.corrupt(x)))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
            running += float(loss.detach()) * len(x)
            seen += len(x)
        val_loss = _evaluate(model, val, batch_size, dev, amp)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val_loss)
        elif sched is not None:
            sched.step()
        history["train_loss"].append(running / max(seen, 1))
        history["val_loss"].append(val_loss)
        history["lr"].append(opt.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best - 1e-6:
            best, bad_epochs = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if ckpt and ckpt_writer:
                ckpt.mkdir(parents=True, exist_ok=True)
                torch.save(best_state, ckpt / "best.pt")
        else:
            bad_epochs += 1
        if ckpt and ckpt_writer:
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched else None,
                    "history": history,
                    "best": best,
                    "bad_epochs": bad_epochs,
                    "epoch": epoch,
                    "generator": gen.get_state(),
                },
                ckpt / "last.pt",
            )
        for callback in callbacks:
            callback(
                epoch,
                {"train_loss": history["train_loss"][-1], "val_loss": val_loss, "lr": history["lr"][-1]},
            )
        if bad_epochs >= early_stopping_patience:
            log.info("early stopping at epoch %d (best val loss %.5f)", epoch + 1, best)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if ckpt and ckpt_writer:
        (ckpt / "history.json").write_text(json.dumps(history))
    return history
