"""A small 3D U-Net (one network per module, as MONAI's ``networks/nets``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from anomaly3d_core.interfaces import Params, Segmenter


def _block(cin: int, cout: int, dropout: float, norm: str) -> nn.Sequential:
    """Two 3x3x3 convolutions, each with a leaky ReLU (and batch norm with ``norm: batch``)."""
    layers: list[nn.Module] = []
    for a, b in ((cin, cout), (cout, cout)):
        if norm == "batch":
            layers += [nn.Conv3d(a, b, 3, padding=1, bias=False), nn.BatchNorm3d(b)]
        else:
            layers.append(nn.Conv3d(a, b, 3, padding=1))
        layers.append(nn.LeakyReLU(0.1, inplace=True))
    if dropout:
        layers.append(nn.Dropout3d(dropout))
    return nn.Sequential(*layers)


class UNet(Segmenter):
    """Encoder-decoder with skip connections; ``channels`` per level, halving the grid between levels.

    Batch norm by default (``norm: none`` drops it): trained on crops and run on whole volumes, a
    voxel's eval-mode output then depends on its neighbourhood only (instance or group norm would
    depend on the input's size). The training loop re-estimates the running statistics over many
    crops before each validation and at the end, as their moving average over a few small batches
    makes the output swing.
    """

    name: ClassVar[str] = "unet"

    class Params(Params):
        channels: list[int] = Field(default_factory=lambda: [16, 32, 64], description="features per level")
        dropout: float = Field(0.0, ge=0, lt=1)
        norm: Literal["batch", "none"] = "batch"

        @field_validator("channels")
        @classmethod
        def _channels(cls, v: list[int]) -> list[int]:
            if len(v) < 2 or any(c < 1 for c in v):
                raise ValueError(f"channels: give at least two positive widths (e.g. [16, 32, 64]), got {v}")
            return v

    def __init__(
        self, in_channels: int = 1, params: Params | Mapping[str, Any] | None = None, **kw: Any
    ) -> None:
        super().__init__(in_channels, params, **kw)
        ch = self.params.channels
        self.size_multiple = 2 ** (len(ch) - 1)
        self.down = nn.ModuleList(
            [
                _block(in_channels if i == 0 else ch[i - 1], c, self.params.dropout, self.params.norm)
                for i, c in enumerate(ch)
            ]
        )
        self.up = nn.ModuleList(
            [nn.ConvTranspose3d(ch[i + 1], ch[i], 2, stride=2) for i in range(len(ch) - 1)]
        )
        self.merge = nn.ModuleList(
            [_block(2 * ch[i], ch[i], 0.0, self.params.norm) for i in range(len(ch) - 1)]
        )
        self.head = nn.Conv3d(ch[0], 1, 1)

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        return {"channels": [4, 8]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool3d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.merge[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.head(x)
