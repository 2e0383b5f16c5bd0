"""Contractive autoencoder (Rifai et al., 2011): penalises the encoder's Jacobian.

The squared Frobenius norm ``||dz/dx||²`` is estimated with one Hutchinson probe
(``E_v ||Jᵀv||²`` with ``v ~ N(0, I)``), which costs one extra backward pass for any depth.
"""

from __future__ import annotations

import torch
from pydantic import Field

from anomaly3d_plugins.autoencoders.standard import AEParams, StandardAutoencoder


class CAEParams(AEParams):
    jacobian_weight: float = Field(1e-3, ge=0, description="weight of the Jacobian penalty (lambda)")


class ContractiveAutoencoder(StandardAutoencoder):
    name = "contractive"
    Params = CAEParams

    def contractive_penalty(self, x: torch.Tensor) -> torch.Tensor:
        """Estimate of the mean ``||dz/dx||_F²`` over the batch; non-negative."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self.encode(x)
            probe = torch.randn_like(z)
            (grad,) = torch.autograd.grad((z * probe).sum(), x, create_graph=self.training)
        return grad.float().pow(2).sum(dim=1).mean()

    def loss(self, x, out):
        rec, parts = super().loss(x, out)
        penalty = self.contractive_penalty(x)
        return rec + self.params.jacobian_weight * penalty, {**parts, "jacobian": float(penalty.detach())}
