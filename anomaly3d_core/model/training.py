"""The one training loop of the package, and the autoencoder training built on it.

:class:`Trainer` owns the optimisation mechanics (optimiser, learning-rate schedule, mixed
precision, gradient clipping) and :func:`fit_loop` runs epochs of batches through it; the
autoencoder (:func:`train_autoencoder`), the MLP embedding projection and the extractor
pretraining all train through these two, each with its own data and loss.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from anomaly3d_core.config import TrainingConfig
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.io.files import atomic_write
from anomaly3d_core.model import distributed
from anomaly3d_core.progress import progress

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float]], None]
Batch = TypeVar("Batch", bound=torch.Tensor)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"training.device: '{device}' is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
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


class Trainer:
    """Optimiser, learning-rate schedule, mixed precision and gradient clipping for ``params``.

    :meth:`step` takes one optimisation step on a loss, :meth:`end_epoch` one schedule step.
    ``amp`` (CUDA autocast with a gradient scaler) is ignored off CUDA.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        scheduler: str = "none",
        num_epochs: int = 1,
        step_size: int = 10,
        gamma: float = 0.5,
        grad_clip: float | None = None,
        amp: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        self.params = list(params)
        self.device = torch.device(device)
        self.amp = bool(amp and self.device.type == "cuda")
        if amp and not self.amp:
            log.info("use_amp ignored: mixed precision needs CUDA, running on %s", self.device)
        self.grad_clip = grad_clip
        self.optimizer = make_optimizer(self.params, optimizer, lr, weight_decay)
        self.scheduler = make_scheduler(self.optimizer, scheduler, num_epochs, step_size, gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    @classmethod
    def from_settings(
        cls, params: Iterable[nn.Parameter], settings: TrainingConfig, device: torch.device
    ) -> Trainer:
        return cls(
            params,
            lr=settings.learning_rate,
            optimizer=settings.optimizer,
            weight_decay=settings.weight_decay,
            scheduler=settings.scheduler_type,
            num_epochs=settings.num_epochs,
            step_size=settings.step_size,
            gamma=settings.gamma,
            grad_clip=settings.grad_clip,
            amp=settings.use_amp,
            device=device,
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, enabled=self.amp)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def end_epoch(self, monitored: float) -> None:
        """One schedule step; ``plateau`` watches ``monitored`` (the validation loss when there is one)."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitored)
        elif self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only, so ``torch.load(weights_only=True)`` reads it back."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def shuffled_batches(
    data: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | None = None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[torch.Tensor]:
    """One epoch of ``data`` rows in a fresh random order drawn from ``generator``.

    With ``world > 1`` every rank draws the same order and takes an equal shard of it, so all
    ranks run the same number of steps.
    """
    order = torch.randperm(len(data), generator=generator)
    if world > 1:
        order = order[: len(order) // world * world][rank::world]
    for idx in order.split(batch_size):
        yield data[idx] if device is None else data[idx].to(device, non_blocking=True)


def fit_loop(
    trainer: Trainer,
    batches: Callable[[int], Iterable[Batch]],
    loss_fn: Callable[[Batch], torch.Tensor],
    *,
    epochs: int,
    start: int = 0,
    modules: Sequence[nn.Module] = (),
    validate: Callable[[], float] | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
    history: dict[str, list[float]] | None = None,
    desc: str = "training",
    show_progress: bool | None = None,
) -> dict[str, list[float]]:
    """Train for epochs ``start .. epochs-1``; returns ``history`` with one entry per epoch.

    Each epoch puts ``modules`` in training mode, takes one :meth:`Trainer.step` per batch of
    ``batches(epoch)`` on ``loss_fn(batch)`` (under autocast), then records ``train_loss`` (the
    mean over samples), ``val_loss`` (when ``validate`` is given) and ``lr`` after the schedule
    step. ``on_epoch(epoch, metrics)`` returning true stops early.
    """
    history = {} if history is None else history
    bar = progress(range(start, epochs), desc=desc, total=max(0, epochs - start), enabled=show_progress)
    for epoch in bar:
        for module in modules:
            module.train()
        running, seen = 0.0, 0
        for batch in batches(epoch):
            with trainer.autocast():
                loss = loss_fn(batch)
            trainer.step(loss)
            running += float(loss.detach()) * len(batch)
            seen += len(batch)
        metrics = {"train_loss": running / max(seen, 1)}
        if validate is not None:
            metrics["val_loss"] = validate()
        trainer.end_epoch(metrics.get("val_loss", metrics["train_loss"]))
        metrics["lr"] = trainer.lr
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        postfix = {"loss": f"{metrics['train_loss']:.4f}"}
        if "val_loss" in metrics:
            postfix["val"] = f"{metrics['val_loss']:.4f}"
        bar.set_postfix(postfix)
        if on_epoch is not None and on_epoch(epoch, metrics):
            break
    bar.close()
    return history


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


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary sibling, renamed into place: a kill never leaves a torn checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """``last.pt``, read with ``weights_only=True`` and refused unless it fits ``model``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"training.resume: cannot read checkpoint {path} ({reason})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "history"} <= set(state):
        raise ConfigError(f"training.resume: {path} is not a training checkpoint of anomaly3d")
    ours, theirs = model.state_dict(), state["model"]
    problem = next(
        (
            f"'{k}' has shape {tuple(theirs[k].shape)}, the network {tuple(v.shape)}"
            for k, v in ours.items()
            if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)
        ),
        None,
    )
    if set(ours) != set(theirs):
        extra, missing = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        problem = f"{len(missing)} weights missing, {len(extra)} unexpected (e.g. '{(missing or extra)[0]}')"
    if problem:
        raise ConfigError(
            f"training.resume: checkpoint {path} was saved from a different network ({problem}); "
            "use another training.checkpoint_dir or set training.resume: false"
        )
    return state


def train_autoencoder(
    autoencoder: nn.Module,
    train_features: torch.Tensor,
    val_features: torch.Tensor | None = None,
    settings: TrainingConfig | None = None,
    *,
    device: str | torch.device | None = None,
    callbacks: Sequence[EpochCallback] = (),
    show_progress: bool | None = None,
) -> dict[str, list[float]]:
    """Train ``autoencoder`` on vectors ``(N, D)``; returns the per-epoch history.

    ``settings`` is the ``training`` config section (defaults when omitted); ``device``
    overrides ``settings.device``. Early stopping watches the validation loss (held-out normal
    data) and the best weights are restored at the end. With ``settings.checkpoint_dir``,
    ``last.pt`` and ``best.pt`` are written each epoch and ``settings.resume`` continues from
    ``last.pt`` exactly where the run stopped (weights, optimiser, schedule and random state),
    so an interrupted and resumed run ends where an uninterrupted one does.
    """
    s = settings if settings is not None else TrainingConfig()
    dev = distributed.local_device() or resolve_device(s.device if device is None else device)
    gen = seed_everything(s.seed)
    model = autoencoder.to(dev)
    rank, world = distributed.rank(), distributed.world_size()
    # Under torchrun, DDP broadcasts rank 0's weights and averages gradients; `forward` goes through it.
    forward = (
        DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if world > 1
        else model
    )
    trainer = Trainer.from_settings(model.parameters(), s, dev)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "lr": []}
    best, best_state, bad_epochs, start = float("inf"), None, 0, 0
    ckpt = Path(s.checkpoint_dir) if s.checkpoint_dir else None
    writes_ckpt = ckpt is not None and distributed.is_main()
    if ckpt and s.resume and (ckpt / "last.pt").is_file():
        state = _load_checkpoint(ckpt / "last.pt", model)
        model.load_state_dict(state["model"])
        trainer.load_state_dict(state)
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
        if state.get("rng") is not None:  # the global stream: corruption noise, VAE sampling
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
    val = val_features if val_features is not None and len(val_features) else train_features

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return model.loss(x, forward(model.corrupt(x)))[0]

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        nonlocal best, best_state, bad_epochs
        if metrics["val_loss"] < best - 1e-6:
            best, bad_epochs = metrics["val_loss"], 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if writes_ckpt:
                _save_atomic(best_state, ckpt / "best.pt")
        else:
            bad_epochs += 1
        if writes_ckpt:
            _save_atomic(
                {
                    "model": model.state_dict(),
                    **trainer.state_dict(),
                    "history": history,
                    "best": best,
                    "bad_epochs": bad_epochs,
                    "epoch": epoch,
                    "generator": gen.get_state(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                },
                ckpt / "last.pt",
            )
        for callback in callbacks:
            callback(epoch, dict(metrics))
        if bad_epochs >= s.early_stopping_patience:
            log.info("early stopping at epoch %d (best val loss %.5f)", epoch + 1, best)
            return True
        return False

    fit_loop(
        trainer,
        lambda epoch: shuffled_batches(train_features, s.batch_size, gen, dev, rank, world),
        loss_fn,
        epochs=s.num_epochs,
        start=start,
        modules=(model,),
        validate=lambda: _evaluate(model, val, s.batch_size, dev, trainer.amp),
        on_epoch=on_epoch,
        history=history,
        desc="training",
        show_progress=show_progress,
    )
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if writes_ckpt:
        atomic_write(ckpt / "history.json", lambda tmp: Path(tmp).write_text(json.dumps(history)))
    return history


def fit_closed_form(
    autoencoder: nn.Module,
    train_features: torch.Tensor,
    val_features: torch.Tensor | None = None,
    settings: TrainingConfig | None = None,
    *,
    device: str | torch.device | None = None,
    callbacks: Sequence[EpochCallback] = (),
) -> dict[str, list[float]]:
    """Fit an autoencoder with ``trainable = False`` in one step (``fit_closed_form``), no gradient loop.

    Returns a one-entry history with the training and validation losses, in the shape that
    :func:`train_autoencoder` returns, and reports it to ``callbacks`` as epoch 0. Under torchrun
    every rank holds the same vectors, so every rank computes the same fit.
    """
    s = settings if settings is not None else TrainingConfig()
    dev = distributed.local_device() or resolve_device(s.device if device is None else device)
    seed_everything(s.seed)
    model = autoencoder.to(dev)
    model.eval()
    with torch.no_grad():
        model.fit_closed_form(train_features.to(dev))
    model.to(dev).eval()
    val = val_features if val_features is not None and len(val_features) else train_features
    metrics = {
        "train_loss": _evaluate(model, train_features, s.batch_size, dev, False),
        "val_loss": _evaluate(model, val, s.batch_size, dev, False),
    }
    for callback in callbacks:
        callback(0, dict(metrics))
    return {"train_loss": [metrics["train_loss"]], "val_loss": [metrics["val_loss"]], "lr": []}
