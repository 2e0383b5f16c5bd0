"""anomaly3d: unsupervised anomaly detection in 3D medical images."""

from anomaly3d_core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
