"""DICOM series: a folder of slices, read with SimpleITK's series reader.

When the folder holds several series, pass ``series_uid`` or the error lists them (and says how
to choose one on the command line). The size the first slice's header claims, times the number
of slices, is checked against the reading limits before any pixel data is read.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import Params, VolumeLoader
from anomaly3d_core.io.sitk_geometry import image_to_volume
from anomaly3d_core.io.volume import Volume
from anomaly3d_plugins.loaders.itk import check_information

CHOOSE = (
    "choose one with series_uid: {} (in a config: data.loader: dicom, data.loader_args: {{series_uid: UID}}; "
    "on the command line: --set data.loader=dicom --set data.loader_args.series_uid=UID)"
)


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
                    folder, f"{len(series)} DICOM series in one folder; " + CHOOSE.format(", ".join(series))
                )
            uid = series[0]
        elif uid not in series:
            raise DataError(
                folder, f"series_uid '{uid}' is not in this folder; " + CHOOSE.format(", ".join(series))
            )
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        try:
            first = sitk.ImageFileReader()
            first.SetFileName(files[0])
            first.ReadImageInformation()
            check_information(first, folder, n_files=len(files))
            image = reader.Execute()
        except RuntimeError as exc:
            raise DataError(
                folder, f"DICOM series {uid} cannot be read ({str(exc).strip().splitlines()[-1]})"
            ) from None
        volume = image_to_volume(image, str(folder))
        volume.meta.update({"format": "dicom", "series_uid": uid, "n_slices": len(files)})
        return volume
