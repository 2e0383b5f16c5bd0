"""DICOM series: a folder of slices, read with SimpleITK's series reader.

When the folder holds several series, pass ``series_uid`` or the error lists them.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import Params, VolumeLoader
from anomaly3d_core.io.sitk_geometry import image_to_volume
from anomaly3d_core.io.volume import Volume


class DicomParams(Params):
    series_uid: str | None = None


class DicomLoader(VolumeLoader):
    name = "dicom"
    extensions = (".dcm",)
    reads_directories = True
    Params = DicomParams

    @classmethod
    def sniff(cls, path: Path) -> bool:
        folder = path if path.is_dir() else path.parent
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))

    def load(self, path: str | Path) -> Volume:
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        if not any(folder.iterdir()):
            raise DataError(folder, "empty folder")
        series = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        if not series:
            raise DataError(folder, "no DICOM series found in this folder")
        uid = self.params.series_uid
        if uid is None:
            if len(series) > 1:
                raise DataError(
                    folder,
                    f"{len(series)} DICOM series in one folder; choose one with series_uid: {', '.join(series)}",
                )
            uid = series[0]
        elif uid not in series:
            raise DataError(folder, f"series_uid '{uid}' not found; series here: {', '.join(series)}")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise DataError(
                folder, f"DICOM series {uid} cannot be read ({str(exc).strip().splitlines()[-1]})"
            ) from None
        volume = image_to_volume(image, str(folder))
        volume.meta.update({"format": "dicom", "series_uid": uid, "n_slices": len(files)})
        return volume
