"""The base network: an MLP encoder to ``latent_dim`` and a mirrored decoder."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from anomaly3d_core.interfaces import Autoencoder, Params
from anomaly3d_core.model.layers import mlp


class AEParams(Params):
    hidden_dims: list[int] = Field(default_factory=lambda: [128, 64])
    latent_dim: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    input_dim: int | None = Field(None, description="derived from the embedding; checked when given")

    @model_validator(mode="after")
    def _positive(self) -> AEParams:
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive, got {self.hidden_dims}")
        return self


class StandardAutoencoder(Autoencoder):
    name = "standard"
    Params = AEParams

    def __init__(self, input_dim: int, params=None, **kwargs) -> None:
        super().__init__(input_dim, params, **kwargs)
        p = self.params
        if p.input_dim is not None and p.input_dim != self.input_dim:
            raise ValueError(
                f"autoencoder.args.input_dim={p.input_dim} but the embedding gives {self.input_dim}"
            )
        self.encoder = mlp([self.input_dim, *p.hidden_dims, self.code_dim()], p.dropout)
        self.decoder = mlp([p.latent_dim, *reversed(p.hidden_dims), self.input_dim], p.dropout)

    def code_dim(self) -> int:
        """Width of the encoder's output (the VAE doubles it for mean and log-variance)."""
        return self.params.latent_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encode(x)
        return {"recon": self.decoder(z), "z": z}
