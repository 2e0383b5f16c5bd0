"""A light 3D CNN: one block per entry of ``feature_dims``, each halving the resolution after the first."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from anomaly3d_core.interfaces import FeatureExtractor, Params


class SimpleParams(Params):
    in_channels: int = Field(1, ge=1)
    feature_dims: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    extract_features: Literal[True] = Field(
        True, description="seed configs only: extractors always return feature maps"
    )


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1),
        nn.LeakyReLU(0.1, inplace=True),
    )


class SimpleCNN3D(FeatureExtractor):
    """Layers ``layer1`` (full resolution), ``layer2`` (1/2), ``layer3`` (1/4) ..."""

    name = "simple"
    Params = SimpleParams

    @classmethod
    def example_params(cls) -> dict:
        return {"feature_dims": [4, 8, 8]}  # narrow: the conformance checks stay fast

    def __init__(self, params=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        dims = self.params.feature_dims
        self.blocks = nn.ModuleDict()
        cin = self.params.in_channels
        for i, cout in enumerate(dims):
            name = f"layer{i + 1}"
            self.blocks[name] = _block(cin, cout, 1 if i == 0 else 2)
            self.layer_channels[name] = cout
            self.layer_strides[name] = 2**i
            cin = cout
        self.layers = tuple(self.blocks)
        self.default_layers = self.layers[:2]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, layers=("layer1", "layer2")) -> dict[str, torch.Tensor]:
        out, last = {}, max(self.layers.index(name) for name in layers)
        for i, (name, block) in enumerate(self.blocks.items()):
            if i > last:
                break
            x = block(x)
            if name in layers:
                out[name] = x
        return out
