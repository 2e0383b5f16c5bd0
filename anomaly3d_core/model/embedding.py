"""Feature embedding: turns a patch of feature maps ``(N, C, p, p, p)`` into a vector ``(N, E)``.

Methods: ``flatten`` (all values), ``avg``/``max`` (pooled per channel), ``adaptive`` (adaptive
average pooling to ``adaptive_size``³ cells), ``mlp`` (flatten, then a learned projection to
``output_dim``, fitted by reconstruction before the autoencoder is trained).
Vectors are standardised with per-dimension statistics of the normal training set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomaly3d_core.config import EmbeddingConfig
from anomaly3d_core.errors import ConfigError, did_you_mean
from anomaly3d_core.model.layers import mlp
from anomaly3d_core.model.training import Trainer, fit_loop, shuffled_batches

METHODS = ("flatten", "avg", "max", "adaptive", "mlp")


class FeatureEmbedding(nn.Module):
    def __init__(
        self,
        input_channels: int,
        patch_size: tuple[int, int, int] | int = (8, 8, 8),
        embedding_method: str = "flatten",
        mlp_hidden_dims: list[int] | None = None,
        output_dim: int = 64,
        adaptive_size: int = 2,
        scales: list[int] | tuple[int, ...] = (1,),
    ) -> None:
        super().__init__()
        self.scales = tuple(sorted(scales))
        if embedding_method not in METHODS:
            raise ConfigError(
                "embedding.embedding_method: " + did_you_mean(embedding_method, METHODS, "method")
            )
        self.input_channels = int(input_channels)
        self.patch_size = tuple(patch_size) if not isinstance(patch_size, int) else (patch_size,) * 3
        self.method = embedding_method
        self.adaptive_size = tuple(min(adaptive_size, p) for p in self.patch_size)
        flat = self.input_channels * int(torch.tensor(self.patch_size).prod())
        self.projection: nn.Module | None = None
        if embedding_method == "mlp":
            dims = [flat, *(mlp_hidden_dims or []), output_dim]
            self.projection = mlp(dims)
            self.reconstruction = mlp(dims[::-1])
        self.register_buffer("mean", torch.zeros(self.output_dim))
        self.register_buffer("std", torch.ones(self.output_dim))

    @property
    def input_size(self) -> tuple[int, int, int]:
        """Patch size the embedding takes: ``patch_size`` times the largest scale."""
        return tuple(p * self.scales[-1] for p in self.patch_size)  # type: ignore[return-value]

    @classmethod
    def from_config(
        cls,
        config: EmbeddingConfig,
        input_channels: int,
        patch_size: tuple[int, int, int],
        scales: list[int] = (1,),
    ) -> FeatureEmbedding:
        return cls(
            input_channels,
            patch_size,
            config.embedding_method,
            config.mlp_hidden_dims,
            config.output_dim,
            config.adaptive_size,
            scales,
        )

    @property
    def output_dim(self) -> int:
        return self.scale_dim * len(self.scales)

    @property
    def scale_dim(self) -> int:
        """Width of one scale's vector."""
        c, p = self.input_channels, self.patch_size
        if self.method in ("avg", "max"):
            return c
        if self.method == "adaptive":
            return c * self.adaptive_size[0] * self.adaptive_size[1] * self.adaptive_size[2]
        if self.method == "mlp":
            return self.projection[-1].out_features  # type: ignore[index]
        return c * p[0] * p[1] * p[2]

    @property
    def spatial_shape(self) -> tuple[int, int, int, int] | None:
        """Layout of the vector as ``(C, d, h, w)`` when it keeps one (for coarse noise)."""
        channels = self.input_channels * len(self.scales)  # scales sit side by side like channels
        if self.method == "flatten":
            return (channels, *self.patch_size)  # type: ignore[return-value]
        if self.method == "adaptive":
            return (channels, *self.adaptive_size)  # type: ignore[return-value]
        return None

    def per_scale(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """Patches ``(N, C, *input_size)`` as one ``(N, C, *patch_size)`` block per scale: centred crops
        of ``patch_size * scale``, average-pooled by ``scale``."""
        if self.scales == (1,):
            return [patches]
        big, blocks = self.input_size, []
        for scale in self.scales:
            size = [p * scale for p in self.patch_size]
            a = [(b - z) // 2 for b, z in zip(big, size, strict=True)]
            crop = patches[:, :, a[0] : a[0] + size[0], a[1] : a[1] + size[1], a[2] : a[2] + size[2]]
            blocks.append(F.avg_pool3d(crop, scale) if scale > 1 else crop)
        return blocks

    def raw(self, patches: torch.Tensor) -> torch.Tensor:
        """Unstandardised vectors, one block per scale side by side."""
        return torch.cat([self._raw_one(block) for block in self.per_scale(patches)], dim=1)

    def _raw_one(self, patches: torch.Tensor) -> torch.Tensor:
        n = patches.shape[0]
        if self.method == "avg":
            return patches.mean(dim=(2, 3, 4))
        if self.method == "max":
            return patches.amax(dim=(2, 3, 4))
        if self.method == "adaptive":
            return F.adaptive_avg_pool3d(patches, self.adaptive_size).reshape(n, -1)
        flat = patches.reshape(n, -1)
        return flat if self.projection is None else self.projection(flat)

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.standardize(self.raw(patches))

    def fit_projection(
        self, patches: torch.Tensor, epochs: int = 20, batch_size: int = 512, lr: float = 1e-3, seed: int = 0
    ) -> FeatureEmbedding:
        """Fit the MLP projection by reconstruction of the flattened patches (no-op for other methods)."""
        if self.projection is None:
            return self
        projection, reconstruction = self.projection, self.reconstruction
        gen = torch.Generator().manual_seed(seed)
        trainer = Trainer([*projection.parameters(), *reconstruction.parameters()], lr=lr)
        # the projection is shared by all scales: every scale's block is a training row
        flat = torch.cat([block.reshape(block.shape[0], -1) for block in self.per_scale(patches)])
        mu, sd = flat.mean(dim=0), flat.std(dim=0).clamp_min(1e-6)

        def loss(x: torch.Tensor) -> torch.Tensor:
            return F.mse_loss((reconstruction(projection(x)) - mu) / sd, (x - mu) / sd)

        fit_loop(
            trainer,
            lambda epoch: shuffled_batches(flat, batch_size, gen),
            loss,
            epochs=epochs,
            desc="fitting projection",
            show_progress=False,
        )
        projection.requires_grad_(False)
        return self

    def fit_standardization(self, raw: torch.Tensor) -> FeatureEmbedding:
        """Per-dimension mean and std of unstandardised vectors of normal data."""
        self.mean.copy_(raw.mean(dim=0))
        self.std.copy_(raw.std(dim=0).clamp_min(1e-3 * float(raw.std()) + 1e-8))
        return self

    def fit(
        self, patches: torch.Tensor, epochs: int = 20, batch_size: int = 512, lr: float = 1e-3, seed: int = 0
    ) -> FeatureEmbedding:
        """Fit the MLP projection (if any), then the standardisation."""
        self.fit_projection(patches, epochs, batch_size, lr, seed)
        with torch.no_grad():
            return self.fit_standardization(torch.cat([self.raw(chunk) for chunk in patches.split(4096)]))
