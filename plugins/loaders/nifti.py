"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel, within the reading limits.

The header is checked against ``ANOMALY3D_MAX_VOXELS``/``ANOMALY3D_MAX_BYTES`` before any voxel
data is read, and a gzip stream is decompressed only as far as the header declares
(see :mod:`anomaly3d_core.io.nifti`).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from anomaly3d_core.interfaces import VolumeLoader
from anomaly3d_core.io.nifti import read_nifti
from anomaly3d_core.io.volume import Volume
from anomaly3d_plugins.loaders import examples


class NiftiLoader(VolumeLoader):
    name = "nifti"
    extensions = (".nii", ".nii.gz")

    @classmethod
    def sniff(cls, path: Path) -> bool:
        try:
            with open(path, "rb") as raw:
                gzipped = raw.read(2) == b"\x1f\x8b"
            with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
                header = f.read(348)
        except (OSError, EOFError):
            return False
        return len(header) == 348 and header[344:347] in (b"n+1", b"ni1", b"n+2")

    @classmethod
    def example_file(cls, folder: Path) -> Path:
        from anomaly3d_core.io.files import save_nifti

        volume = examples.example_volume()
        return save_nifti(volume.array, volume.affine, Path(folder) / "example.nii.gz")

    @classmethod
    def example_volume(cls) -> Volume:
        return examples.example_volume()

    def load(self, path: str | Path) -> Volume:
        data, affine = read_nifti(path)
        return Volume(data, affine, str(path), {"format": "nifti"})
