"""Built-in volume loaders: NIfTI, NumPy, DICOM series and ITK formats."""

from anomaly3d_core.hookspecs import hookimpl
from anomaly3d_plugins.loaders.dicom import DicomLoader
from anomaly3d_plugins.loaders.itk import ItkLoader
from anomaly3d_plugins.loaders.nifti import NiftiLoader
from anomaly3d_plugins.loaders.numpy import NumpyLoader

__all__ = ["DicomLoader", "ItkLoader", "NiftiLoader", "NumpyLoader"]


@hookimpl
def anomaly3d_register_loaders():
    return [NiftiLoader, NumpyLoader, DicomLoader, ItkLoader]
