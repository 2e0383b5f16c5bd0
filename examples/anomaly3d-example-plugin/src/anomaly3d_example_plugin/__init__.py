"""An example anomaly3d plugin package: one component of each family, registered by the hooks below.

The entry point ``example = "anomaly3d_example_plugin"`` in the ``anomaly3d`` group (see
``pyproject.toml``) points here; anomaly3d calls each ``@hookimpl`` function and registers the
classes it returns.
"""

from anomaly3d_core import hookimpl
from anomaly3d_example_plugin.filterbank import FilterBank
from anomaly3d_example_plugin.mgh import MghLoader
from anomaly3d_example_plugin.pca import PCAAutoencoder
from anomaly3d_example_plugin.thresholds import TopFraction

__all__ = ["FilterBank", "MghLoader", "PCAAutoencoder", "TopFraction"]
__version__ = "0.1.0"


@hookimpl
def anomaly3d_register_extractors():
    return [FilterBank]


@hookimpl
def anomaly3d_register_autoencoders():
    return [PCAAutoencoder]


@hookimpl
def anomaly3d_register_thresholds():
    return [TopFraction]


@hookimpl
def anomaly3d_register_loaders():
    return [MghLoader]
