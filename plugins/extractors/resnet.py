"""3D ResNets (He et al., 2016) in the layout of MedicalNet (Chen et al., 2019), ``in_channels=1``.

Checkpoints in that layout (``state_dict`` with optional ``module.`` prefixes) load through
``extractor.checkpoint``; without one the weights are randomly initialised and frozen.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from anomaly3d_core.interfaces import FeatureExtractor, Params


class ResNetParams(Params):
    in_channels: int = Field(1, ge=1)
    width: int = Field(64, ge=4, description="channels of layer1; 64 is the published size")
    extract_features: Literal[True] = Field(
        True, description="seed configs only: extractors always return feature maps"
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))


class ResNet3D(FeatureExtractor):
    """Stem (7³ conv, stride 2, max-pool) then ``layer1``..``layer4`` at strides 4, 8, 16, 32."""

    block: ClassVar[type[nn.Module]] = BasicBlock
    depths: ClassVar[tuple[int, int, int, int]] = (2, 2, 2, 2)
    layers = ("layer1", "layer2", "layer3", "layer4")
    default_layers = ("layer1", "layer2")
    Params = ResNetParams

    @classmethod
    def example_params(cls) -> dict:
        return {"width": 8}  # narrow: the conformance checks stay fast

    def __init__(self, params=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        w = self.params.width
        self.conv1 = nn.Conv3d(self.params.in_channels, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        cin = w
        for i, (depth, mult) in enumerate(zip(self.depths, (1, 2, 4, 8), strict=True)):
            planes, stride = w * mult, 1 if i == 0 else 2
            blocks = [self.block(cin, planes, stride)]
            cin = planes * self.block.expansion
            blocks += [self.block(cin, planes) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.layer_channels[f"layer{i + 1}"] = cin
            self.layer_strides[f"layer{i + 1}"] = 4 * 2**i
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, layers=("layer1", "layer2")) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out, last = {}, max(self.layers.index(name) for name in layers)
        for name in self.layers[: last + 1]:
            x = getattr(self, name)(x)
            if name in layers:
                out[name] = x
        return out


class ResNet18(ResNet3D):
    name = "resnet18"
    depths = (2, 2, 2, 2)


class ResNet34(ResNet3D):
    name = "resnet34"
    depths = (3, 4, 6, 3)


class ResNet50(ResNet3D):
    name = "resnet50"
    block = Bottleneck
    depths = (3, 4, 6, 3)
