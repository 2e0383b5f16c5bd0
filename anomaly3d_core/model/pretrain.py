"""Self-supervised pretraining of a CNN extractor on the normal training volumes.

Without downloadable weights, an extractor is either random and frozen, or pretrained here:
the extractor is the encoder of a denoising convolutional autoencoder (a small decoder
upsamples its deepest selected layer back to the input) trained on random crops, then frozen.
Joint training with the patch autoencoder is not offered: reconstructing the extractor's own
output lets the extractor collapse to constant features, a trivial zero-error solution.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomaly3d_core.interfaces import FeatureExtractor
from anomaly3d_core.model.training import Trainer, fit_loop


class _Decoder(nn.Module):
    def __init__(self, channels: int, stride: int, out_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.body = nn.Sequential(
            nn.Conv3d(channels, 32, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv3d(32, out_channels, 3, padding=1),
        )

    def forward(self, feat: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return (
            self.body(F.interpolate(feat, size=size, mode="trilinear", align_corners=False))
            if self.stride > 1
            else self.body(feat)
        )


def _crops(arrays: list[np.ndarray], size: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random crops ``(n, C, size, size, size)`` of prepared arrays (3D ones are one channel)."""
    out = []
    for _ in range(n):
        a = arrays[rng.integers(len(arrays))]
        a = a if a.ndim == 4 else a[None]
        starts = [rng.integers(0, max(1, s - size + 1)) for s in a.shape[1:]]
        crop = a[(slice(None), *(slice(st, st + size) for st in starts))]
        crop = np.pad(crop, [(0, 0)] + [(0, size - c) for c in crop.shape[1:]], mode="edge")
        out.append(crop)
    return torch.from_numpy(np.stack(out).astype(np.float32))


def pretrain_extractor(
    extractor: FeatureExtractor,
    layers: list[str],
    arrays: list[np.ndarray],
    epochs: int,
    crop: int = 32,
    steps_per_epoch: int = 20,
    batch_size: int = 4,
    noise: float = 0.2,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train ``extractor`` in place by denoising reconstruction; returns the loss per epoch."""
    if not any(p.numel() for p in extractor.parameters()):
        return []
    deepest = max(layers, key=lambda name: extractor.layer_strides[name])
    decoder = _Decoder(
        extractor.layer_channels[deepest], extractor.layer_strides[deepest], extractor.in_channels
    )
    extractor.requires_grad_(True).train().to(device)
    decoder.to(device)
    trainer = Trainer([*extractor.parameters(), *decoder.parameters()], lr=lr, device=device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        for _ in range(steps_per_epoch):
            yield _crops(arrays, crop, batch_size, rng).to(device)

    def loss(x: torch.Tensor) -> torch.Tensor:
        coarse = F.interpolate(
            torch.randn(x.shape[0], 1, 4, 4, 4, device=device),
            size=x.shape[2:],
            mode="trilinear",
            align_corners=False,
        )
        recon = decoder(extractor(x + noise * coarse, [deepest])[deepest], tuple(x.shape[2:]))
        return F.mse_loss(recon, x)

    history = fit_loop(
        trainer, batches, loss, epochs=epochs, modules=(extractor, decoder), desc="pretraining extractor"
    )
    extractor.freeze()
    return history.get("train_loss", [])
