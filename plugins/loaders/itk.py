"""ITK formats (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) through SimpleITK."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import VolumeLoader
from anomaly3d_core.io.sitk_geometry import image_to_volume
from anomaly3d_core.io.volume import Volume


class ItkLoader(VolumeLoader):
    name = "itk"
    extensions = (".nrrd", ".nhdr", ".mha", ".mhd")

    def load(self, path: str | Path) -> Volume:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
            raise DataError(path, f"corrupt or unreadable ITK image ({reason})") from None
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise DataError(
                path,
                f"{image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed",
            )
        volume = image_to_volume(image, str(path))
        volume.meta["format"] = "itk"
        return volume
