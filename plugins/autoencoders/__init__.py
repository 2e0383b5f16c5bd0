"""Built-in autoencoders: one MLP network, variants as subclasses."""

from anomaly3d_core.hookspecs import hookimpl
from anomaly3d_plugins.autoencoders.contractive import ContractiveAutoencoder
from anomaly3d_plugins.autoencoders.denoising import DenoisingAutoencoder
from anomaly3d_plugins.autoencoders.standard import StandardAutoencoder
from anomaly3d_plugins.autoencoders.variational import VariationalAutoencoder

__all__ = ["ContractiveAutoencoder", "DenoisingAutoencoder", "StandardAutoencoder", "VariationalAutoencoder"]


@hookimpl
def anomaly3d_register_autoencoders():
    return [StandardAutoencoder, VariationalAutoencoder, DenoisingAutoencoder, ContractiveAutoencoder]
