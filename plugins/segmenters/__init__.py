"""Built-in segmentation networks (the synthetic-anomaly detector's models)."""

from anomaly3d_core.hookspecs import hookimpl
from anomaly3d_plugins.segmenters.unet import UNet

__all__ = ["UNet"]


@hookimpl
def anomaly3d_register_segmenters():
    return [UNet]
