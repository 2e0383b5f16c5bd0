"""A fixed filter bank: Gaussian smoothing and gradient magnitude at several scales.

Nothing is learned: the kernels are registered buffers, so they move with ``.to(device)`` and the
extractor is deterministic (it is used frozen, as every extractor is). Layers: ``bank`` at full
resolution and ``coarse`` (the bank average-pooled by 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from anomaly3d_core.interfaces import FeatureExtractor, Params


class FilterBankParams(Params):
    in_channels: int = Field(1, ge=1)
    sigmas: list[float] = Field(
        default_factory=lambda: [1.0, 2.0], min_length=1, description="scales in voxels"
    )


class FilterBank(FeatureExtractor):
    """Per input channel: the intensity, then per scale its Gaussian smoothing and gradient magnitude."""

    name = "filterbank"
    api_version = 1
    layers = ("bank", "coarse")
    default_layers = ("bank",)
    Params = FilterBankParams

    def __init__(self, params=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        for i, sigma in enumerate(self.params.sigmas):
            radius = max(1, math.ceil(3 * sigma))
            x = torch.arange(-radius, radius + 1, dtype=torch.float32)
            kernel = torch.exp(-0.5 * (x / sigma) ** 2)
            self.register_buffer(f"kernel{i}", kernel / kernel.sum())
        channels = self.in_channels * (1 + 2 * len(self.params.sigmas))
        self.layer_channels = {"bank": channels, "coarse": channels}
        self.layer_strides = {"bank": 1, "coarse": 2}

    def _smooth(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        r, c = kernel.numel() // 2, x.shape[1]
        for axis in range(3):
            shape = [1, 1, 1]
            shape[axis] = kernel.numel()
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
            weight = kernel.reshape(1, 1, *shape).expand(c, 1, *shape)
            x = F.conv3d(F.pad(x, pad, mode="replicate"), weight, groups=c)
        return x

    @staticmethod
    def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
        d = padded[:, :, 2:, 1:-1, 1:-1] - padded[:, :, :-2, 1:-1, 1:-1]
        h = padded[:, :, 1:-1, 2:, 1:-1] - padded[:, :, 1:-1, :-2, 1:-1]
        w = padded[:, :, 1:-1, 1:-1, 2:] - padded[:, :, 1:-1, 1:-1, :-2]
        return 0.5 * torch.sqrt(d**2 + h**2 + w**2 + 1e-12)

    def forward(self, x: torch.Tensor, layers=("bank",)) -> dict[str, torch.Tensor]:
        maps = [x]
        for i in range(len(self.params.sigmas)):
            smooth = self._smooth(x, getattr(self, f"kernel{i}"))
            maps += [smooth, self._gradient_magnitude(smooth)]
        bank = torch.cat(maps, dim=1)
        out = {}
        if "bank" in layers:
            out["bank"] = bank
        if "coarse" in layers:
            out["coarse"] = F.avg_pool3d(bank, 2, ceil_mode=True)
        return out
