"""Variational autoencoder (Kingma & Welling, 2014) with a beta-weighted KL term."""

from __future__ import annotations

import torch
from pydantic import Field

from anomaly3d_plugins.autoencoders.standard import AEParams, StandardAutoencoder


class VAEParams(AEParams):
    latent_dim: int = Field(16, ge=1)
    beta: float = Field(1.0, ge=0)
    kl_in_score: float = Field(0.0, ge=0, description="weight of the per-sample KL term in the anomaly score")


class VariationalAutoencoder(StandardAutoencoder):
    name = "variational"
    Params = VAEParams

    def code_dim(self) -> int:
        return 2 * self.params.latent_dim

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"recon": self.decoder(z), "z": z, "mu": mu, "logvar": logvar}

    @staticmethod
    def kl_divergence(out: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, ``(N,)``; never negative."""
        mu, logvar = out["mu"].float(), out["logvar"].float()
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)

    def loss(self, x, out):
        rec, parts = super().loss(x, out)
        # KL per latent unit and input dimension keeps beta comparable across sizes.
        kl = self.kl_divergence(out).mean() / self.input_dim
        return rec + self.params.beta * kl, {**parts, "kl": float(kl.detach())}

    def anomaly_score(self, x, out):
        score = super().anomaly_score(x, out)
        if self.params.kl_in_score:
            score = score + self.params.kl_in_score * self.kl_divergence(out) / self.input_dim
        return score
