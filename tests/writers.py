"""Writers for every supported format, used to build test inputs on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from anomaly3d_core.io.files import save_nifti
from anomaly3d_core.io.sitk_geometry import volume_to_image
from anomaly3d_plugins.loaders.dicom import write_series as write_dicom_series


def write_nifti(array, affine, folder: Path, name: str = "scan") -> Path:
    return save_nifti(array, affine, folder / f"{name}.nii.gz")


def write_npy(array, affine, folder: Path, name: str = "scan") -> Path:
    np.save(folder / f"{name}.npy", array)
    np.save(folder / f"{name}.affine.npy", affine)
    return folder / f"{name}.npy"


def write_npz(array, affine, folder: Path, name: str = "scan") -> Path:
    np.savez(folder / f"{name}.npz", volume=array, affine=affine)
    return folder / f"{name}.npz"


def write_itk(ext: str):
    def write(array, affine, folder: Path, name: str = "scan") -> Path:
        path = folder / f"{name}{ext}"
        sitk.WriteImage(volume_to_image(np.asarray(array, np.float32), affine), str(path))
        return path

    return write


WRITERS = {
    "nifti": write_nifti,
    "numpy-npy": write_npy,
    "numpy-npz": write_npz,
    "itk-nrrd": write_itk(".nrrd"),
    "itk-mha": write_itk(".mha"),
    "itk-mhd": write_itk(".mhd"),
    "dicom": write_dicom_series,
}
