"""Writers for every supported format, used to build test inputs on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from anomaly3d_core.io.files import save_nifti
from anomaly3d_core.io.sitk_geometry import volume_to_image


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


def write_dicom_series(
    array, affine, folder: Path, name: str = "series", series_uid: str = "1.2.826.0.1.3680043.2.1125.1"
) -> Path:
    """One file per slice with the geometry tags a scanner would write (int16 pixels)."""
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(volume_to_image(np.asarray(array, np.float32), affine), sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
            "0020|0037": "\\".join(
                f"{v:.6f}"
                for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
            ),
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(out / f"{series_uid.split('.')[-1]}_{k:03d}.dcm"))
        writer.Execute(piece)
    return out


WRITERS = {
    "nifti": write_nifti,
    "numpy-npy": write_npy,
    "numpy-npz": write_npz,
    "itk-nrrd": write_itk(".nrrd"),
    "itk-mha": write_itk(".mha"),
    "itk-mhd": write_itk(".mhd"),
    "dicom": write_dicom_series,
}
