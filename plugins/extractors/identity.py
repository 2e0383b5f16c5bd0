"""Raw intensities as features: the autoencoder then sees plain intensity patches."""

from __future__ import annotations

import torch
from pydantic import Field

from anomaly3d_core.interfaces import FeatureExtractor, Params


class IdentityParams(Params):
    in_channels: int = Field(1, ge=1)


class IdentityExtractor(FeatureExtractor):
    name = "identity"
    layers = ("input",)
    default_layers = ("input",)
    Params = IdentityParams

    def __init__(self, params=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.layer_channels = {"input": self.params.in_channels}
        self.layer_strides = {"input": 1}

    def forward(self, x: torch.Tensor, layers=("input",)) -> dict[str, torch.Tensor]:
        return {"input": x}
