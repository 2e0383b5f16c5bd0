"""Training a segmentation network on normal scans with synthetic anomalies, and running it.

The loop samples crops of the training arrays, corrupts them on the fly
(:func:`anomaly3d_core.model.corruption.corrupt`) and teaches the network to predict the per-voxel
target. Every ``validate_every`` iterations it scores whole held-out normal volumes corrupted with
*other* kinds of anomaly (fixed draws) and keeps the weights with the best voxel AP there: the
choice of training length is made on what the network has to generalise to, not on its own task.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from anomaly3d_core.model import distributed
from anomaly3d_core.model.corruption import CorruptionSpec, corrupt, normal_variation
from anomaly3d_core.model.training import EpochCallback

log = logging.getLogger(__name__)


#: batches of crops that batch-norm statistics are re-estimated from before each validation
NORM_BATCHES = 16


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from the config (``synthetic.training`` and ``synthetic.validation``)."""

    iterations: int
    crop_size: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    dice_weight: float
    validate_every: int
    normal_variation: float
    use_amp: bool
    seed: int


def _channels_first(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 3 else a


class CropSampler:
    """Random crops of ``size``³ centred on foreground voxels; arrays are padded once with their background."""

    def __init__(self, arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int) -> None:
        self.size, half = size, size // 2
        self.arrays, self.masks, self.centres = [], [], []
        for a, m in zip(arrays, masks, strict=True):
            x = _channels_first(np.asarray(a, np.float32))
            bg = [float(c[~m].min()) if (~m).any() else float(c.min()) for c in x]
            pad = [(half, half)] * 3
            self.arrays.append(
                np.stack([np.pad(c, pad, constant_values=b) for c, b in zip(x, bg, strict=True)])
            )
            self.masks.append(np.pad(m, pad))
            self.centres.append(np.flatnonzero(m))

    def crop(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One crop ``(C, S, S, S)`` of volume ``index`` and its foreground."""
        mask = self.masks[index]
        shape = tuple(s - 2 * (self.size // 2) for s in mask.shape)
        centres = self.centres[index]
        c = np.unravel_index(centres[rng.integers(centres.size)], shape)  # padded: corner = centre
        box = tuple(slice(int(i), int(i) + self.size) for i in c)
        return self.arrays[index][(slice(None), *box)], mask[box]


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch (one region: stable when most crops hold little anomaly)."""
    inter = (prob * target).sum()
    return 1.0 - (2 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)


def segment_volume(
    model: nn.Module, array: np.ndarray, device: torch.device, amp: bool = False
) -> np.ndarray:
    """The network's sigmoid output on a whole array ``(X, Y, Z)`` or ``(C, X, Y, Z)``, same grid."""
    x = _channels_first(np.asarray(array, np.float32))
    multiple = int(getattr(model, "size_multiple", 1))
    shape = x.shape[1:]
    pad = [(0, (-s) % multiple) for s in shape]
    x = np.stack([np.pad(c, pad, mode="edge") for c in x])
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        logits = model(torch.from_numpy(x)[None].to(device))
    out = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]], dtype=np.float32)


def validation_set(
    arrays: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spec: CorruptionSpec,
    samples: int,
    seed: int,
    sequences: Sequence[str] = (),
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(corrupted array, target, foreground)`` per sample: fixed draws of the validation kinds."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for i, (a, m) in enumerate(zip(arrays, masks, strict=True)):
        for _ in range(samples):
            donor = arrays[(i + 1) % len(arrays)] if len(arrays) > 1 else None
            donor = donor if donor is not None and np.shape(donor) == np.shape(a) else None
            x, t = corrupt(a, m, rng, spec, donor=donor, sequences=sequences, force=True)
            out.append((x, t, m))
    return out


def validation_ap(
    model: nn.Module,
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    device: torch.device,
    amp: bool,
) -> float:
    """Pooled voxel AP over the foreground; positives: target >= 0.5, voxels with 0 < target < 0.5 left out."""
    from sklearn.metrics import average_precision_score

    ys, ss = [], []
    for x, t, m in samples:
        s = segment_volume(model, x, device, amp)
        keep = m & ((t >= 0.5) | (t == 0))
        ys.append(t[keep] >= 0.5)
        ss.append(s[keep])
    y = np.concatenate(ys)
    return float(average_precision_score(y, np.concatenate(ss))) if y.any() else float("nan")


def refresh_norm_statistics(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate batch-norm running statistics as a plain average over ``batches`` (precise BN)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def train_segmenter(
    model: nn.Module,
    arrays: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spec: CorruptionSpec,
    settings: LoopSettings,
    device: torch.device,
    validation: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
    sequences: Sequence[str] = (),
    callbacks: Sequence[EpochCallback] = (),
) -> dict[str, list[float]]:
    """Train ``model`` in place; returns the history (mean training loss between checks, validation AP, seconds).

    Under ``torchrun`` (:mod:`anomaly3d_core.model.distributed`) each rank draws its own crops and
    DDP averages the gradients, so a batch is ``batch_size`` crops per rank.
    """
    s = settings
    rng = np.random.default_rng([s.seed, 3, distributed.rank()])  # each rank its own crops
    sampler = CropSampler(arrays, masks, s.crop_size)
    model.to(device).train()
    net: nn.Module = model
    if distributed.active():  # under torchrun: DDP averages the gradients, ranks keep equal weights
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
    warmup = max(1, min(50, s.iterations // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / s.iterations))
    )
    amp = s.use_amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    bce = nn.BCEWithLogitsLoss()
    history: dict[str, list[float]] = {"iteration": [], "train_loss": [], "val_ap": [], "seconds": []}
    best, best_state, running, t0 = -1.0, None, [], time.perf_counter()
    n = len(arrays)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        xs, ts = [], []
        for _ in range(s.batch_size):
            i = int(rng.integers(n))
            x, m = sampler.crop(i, rng)
            donor = sampler.crop(int(rng.integers(n)) if n > 1 else i, rng)[0]
            if rng.random() < s.normal_variation:
                x = normal_variation(x, m, rng)
            x, t = corrupt(x, m, rng, spec, donor=donor, sequences=sequences)
            xs.append(x)
            ts.append(t[None])
        return torch.from_numpy(np.stack(xs)).to(device), torch.from_numpy(np.stack(ts)).to(device)

    for it in range(s.iterations):
        x_b, t_b = batch()
        net.train()
        with torch.autocast(device.type, enabled=amp):
            logits = net(x_b)
        logits = logits.float()
        loss = bce(logits, t_b) + s.dice_weight * soft_dice_loss(torch.sigmoid(logits), t_b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        running.append(float(loss.detach()))
        if (it + 1) % s.validate_every == 0 or it + 1 == s.iterations:
            refresh_norm_statistics(model, [batch()[0] for _ in range(NORM_BATCHES)])
            ap = validation_ap(model, validation, device, amp) if validation else float("nan")
            history["iteration"].append(it + 1)
            history["train_loss"].append(float(np.mean(running)))
            history["val_ap"].append(ap)
            history["seconds"].append(round(time.perf_counter() - t0, 1))
            log.info("iteration %d: loss %.4f, validation AP %.3f", it + 1, np.mean(running), ap)
            running = []
            if validation and np.isfinite(ap) and ap > best:
                best, best_state = ap, copy.deepcopy(model.state_dict())
            for cb in callbacks:
                cb(it + 1, {"train_loss": history["train_loss"][-1], "val_ap": ap})
    if best_state is not None:
        model.load_state_dict(best_state)
        history["best_iteration"] = [history["iteration"][int(np.nanargmax(history["val_ap"]))]]
    model.eval()
    return history
