"""Denoising autoencoder (Vincent et al., 2008): trained to undo corruption of its input.

``noise_type='gaussian'`` adds i.i.d. noise; ``'coarse'`` adds low-frequency noise, drawn on a
coarse grid and upsampled over the patch (Kascenas et al., 2022), which suits lesions better.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from anomaly3d_plugins.autoencoders.standard import AEParams, StandardAutoencoder


class DAEParams(AEParams):
    noise_factor: float = Field(0.1, ge=0)
    noise_type: Literal["gaussian", "coarse"] = "gaussian"
    coarse_size: int = Field(2, ge=1, description="grid size per axis the coarse noise is drawn on")


class DenoisingAutoencoder(StandardAutoencoder):
    name = "denoising"
    Params = DAEParams

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.noise_type == "gaussian" or p.noise_factor == 0:
            return x + p.noise_factor * torch.randn_like(x)
        return x + p.noise_factor * self.coarse_noise(x)

    def coarse_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Low-frequency noise over the patch layout in ``spatial_shape`` (set by the pipeline), else
        smooth along the features."""
        n, s = x.shape[0], self.params.coarse_size
        if self.spatial_shape is not None and int(torch.tensor(self.spatial_shape).prod()) == x.shape[1]:
            c, *size = self.spatial_shape
            noise = torch.randn(n, c, s, s, s, device=x.device, dtype=x.dtype)
            return F.interpolate(noise, size=tuple(size), mode="trilinear", align_corners=False).reshape(
                n, -1
            )
        noise = torch.randn(
            n, 1, s, device=x.device, dtype=x.dtype
        )  # no spatial layout: smooth along features
        return F.interpolate(noise, size=x.shape[1], mode="linear", align_corners=False).reshape(n, -1)
