"""DICOM series: a folder of slices, read with SimpleITK's series reader.

When the folder holds several series, pass ``series_uid`` or the error lists them (and says how
to choose one on the command line). The size the first slice's header claims, times the number
of slices, is checked against the reading limits before any pixel data is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import Params, VolumeLoader
from anomaly3d_core.io.sitk_geometry import image_to_volume, volume_to_image
from anomaly3d_core.io.volume import Volume
from anomaly3d_plugins.loaders import examples
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
    def example_file(cls, folder: Path) -> Path:
        volume = cls.example_volume()
        return write_series(volume.array, volume.affine, Path(folder), "example_series")

    @classmethod
    def example_volume(cls) -> Volume:
        return examples.example_volume(np.int16)  # a series of int16 slices, one file each

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
        check_slice_positions(folder, uid, files)
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


def slice_positions(files: Sequence[str]) -> np.ndarray:
    """Each slice file's position along the slice normal (mm), from its position and orientation tags."""
    positions = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            origin = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DataError(
                name, f"slice header cannot be read ({reason}); the file is truncated or not DICOM"
            ) from None
        normal = np.cross(cosines[:3], cosines[3:6])
        positions.append(float(np.dot(normal, origin)))
    return np.asarray(positions)


def check_slice_positions(folder: Path, uid: str, files: Sequence[str]) -> None:
    """Refuse a series with duplicated, missing or unevenly spaced slices, naming the slices.

    ITK would read such a series as a regular grid at the mean spacing, silently shifting anatomy;
    the scores (and the decision) then describe a distorted scan.
    """
    if len(files) < 3:
        return
    pos = slice_positions(files)
    order = np.argsort(pos)
    gaps = np.diff(pos[order])
    step = float(np.median(gaps))
    where = f"DICOM series {uid}"
    for i, gap in enumerate(gaps):
        a, b = Path(files[order[i]]).name, Path(files[order[i + 1]]).name
        if gap < max(1e-3, 0.01 * step):
            raise DataError(
                folder,
                f"{where}: slices {a} and {b} lie at the same position ({pos[order[i]]:.2f} mm): a "
                "duplicated slice; remove the copy and retry",
            )
    uneven = np.abs(gaps - step) > max(0.01, 0.05 * step)
    if uneven.any():
        i = int(np.argmax(np.abs(gaps - step)))
        a, b = Path(files[order[i]]).name, Path(files[order[i + 1]]).name
        missing = max(1, round(gaps[i] / step) - 1) if gaps[i] > step else 0
        what = f"{missing} slice(s) missing or unreadable there" if missing else "unevenly spaced slices"
        raise DataError(
            folder,
            f"{where}: slices {a} and {b} are {gaps[i]:.2f} mm apart where the others are {step:.2f} mm: "
            f"{what}; a scan needs evenly spaced slices",
        )


def write_series(
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
