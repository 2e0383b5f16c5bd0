"""A PCA "autoencoder": project onto the leading principal components and back.

It fits in closed form (``trainable = False``): the pipeline calls ``fit_closed_form`` once with
every training vector instead of running the gradient loop. The fitted mean and components live
in registered buffers, so they are saved with the model's weights.
"""

from __future__ import annotations

import torch
from pydantic import Field

from anomaly3d_core.interfaces import Autoencoder, Params


class PCAParams(Params):
    n_components: int = Field(8, ge=1, description="principal components kept (at most input_dim)")


class PCAAutoencoder(Autoencoder):
    """Reconstruction from the leading principal components of the training vectors."""

    name = "pca"
    api_version = 1
    trainable = False
    Params = PCAParams

    def __init__(self, input_dim: int, params=None, **kwargs) -> None:
        super().__init__(input_dim, params, **kwargs)
        k = min(self.params.n_components, self.input_dim)
        self.register_buffer("mean", torch.zeros(self.input_dim))
        self.register_buffer("components", torch.zeros(k, self.input_dim))

    def fit_closed_form(self, vectors: torch.Tensor) -> None:
        x = vectors.float()
        mean = x.mean(dim=0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        k = min(self.components.shape[0], vh.shape[0])
        self.mean.copy_(mean)
        self.components.zero_()
        self.components[:k] = vh[:k]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = (x.float() - self.mean) @ self.components.T
        return {"recon": (z @ self.components + self.mean).to(x.dtype), "z": z}
