"""The contracts a plugin implements, one abstract base per family.

Every component declares its parameters as a pydantic model ``Params`` (unknown keys are
rejected), so a typo in a plugin's arguments is caught when the config is validated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from anomaly3d_core.io.volume import Volume


class Params(BaseModel):
    """Base of every plugin's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Component:
    """Mixin shared by all families: a unique ``name`` and a ``Params`` model."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    @classmethod
    def validate_params(cls, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> Params:
        if isinstance(params, BaseModel):
            return params if not kwargs else cls.Params(**{**params.model_dump(), **kwargs})
        return cls.Params(**{**dict(params or {}), **kwargs})


class FeatureExtractor(Component, nn.Module):
    """Maps a ``(B, C_in, D, H, W)`` volume to named feature maps.

    Subclasses set ``layer_channels`` and ``layer_strides`` (per layer name) in ``__init__``
    and list their layers, shallow to deep, in ``layers``.
    """

    layers: ClassVar[tuple[str, ...]] = ()
    default_layers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.params = self.validate_params(params, **kwargs)
        self.layer_channels: dict[str, int] = {}
        self.layer_strides: dict[str, int] = {}

    @abstractmethod
    def forward(self, x: torch.Tensor, layers: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """Return the feature map of every requested layer."""


class Autoencoder(Component, nn.Module):
    """Reconstructs embedding vectors ``(N, input_dim)``; variants override the hooks below."""

    def __init__(
        self, input_dim: int, params: Params | Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        nn.Module.__init__(self)
        self.params = self.validate_params(params, **kwargs)
        self.input_dim = int(input_dim)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return at least ``{'recon': ...}``."""

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """Input seen during training (denoising variants add noise here)."""
        return x

    def loss(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss and its named parts."""
        rec = ((out["recon"].float() - x.float()) ** 2).mean()
        return rec, {"recon": float(rec.detach())}

    def anomaly_score(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample anomaly score ``(N,)``: mean squared reconstruction error."""
        return ((out["recon"].float() - x.float()) ** 2).mean(dim=1)


class ThresholdMethod(Component, ABC):
    """A decision rule on anomaly scores, fitted scikit-learn style (``fit`` sets ``threshold_``).

    ``calibration`` is ``"normal"`` for rules fitted on scores of normal data only and
    ``"adaptive"`` for rules that split a score map or mixed distribution.
    """

    calibration: ClassVar[str] = "normal"

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.params = self.validate_params(params, **kwargs)

    @abstractmethod
    def _compute(self, scores: np.ndarray) -> float:
        """Threshold for finite, 1D ``scores``."""

    def fit(self, scores: np.ndarray) -> ThresholdMethod:
        values = np.asarray(scores, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(f"threshold '{self.name}': no finite scores to fit on")
        self.threshold_ = float(self._compute(values))
        return self

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask, ``True`` where a score exceeds the fitted threshold."""
        if not hasattr(self, "threshold_"):
            raise RuntimeError(f"threshold '{self.name}' is not fitted; call fit(scores) first")
        return np.asarray(scores) > self.threshold_


class VolumeLoader(Component, ABC):
    """Reads one format into a :class:`Volume` with RAS+ affine.

    The loader is chosen by ``extensions`` (lower-case, with the dot) or, for directories
    and unknown extensions, by :meth:`sniff` on the content.
    """

    extensions: ClassVar[tuple[str, ...]] = ()
    reads_directories: ClassVar[bool] = False

    def __init__(self, params: Params | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.params = self.validate_params(params, **kwargs)

    @classmethod
    def matches_extension(cls, path: Path) -> bool:
        name = path.name.lower()
        return any(name.endswith(ext) for ext in cls.extensions)

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """True when the content (not the name) looks like this format."""
        return False

    @abstractmethod
    def load(self, path: str | Path) -> Volume:
        """Read ``path``; raise :class:`~anomaly3d_core.errors.DataError` on bad input."""
