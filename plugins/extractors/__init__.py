"""Built-in 3D feature extractors: a light CNN, 3D ResNets and raw intensities."""

from anomaly3d_core.hookspecs import hookimpl
from anomaly3d_plugins.extractors.identity import IdentityExtractor
from anomaly3d_plugins.extractors.resnet import ResNet3D, ResNet18, ResNet34, ResNet50
from anomaly3d_plugins.extractors.simple import SimpleCNN3D

__all__ = ["IdentityExtractor", "ResNet3D", "ResNet18", "ResNet34", "ResNet50", "SimpleCNN3D"]


@hookimpl
def anomaly3d_register_extractors():
    return [SimpleCNN3D, ResNet18, ResNet34, ResNet50, IdentityExtractor]
