"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import VolumeLoader
from anomaly3d_core.io.volume import Volume


class NiftiLoader(VolumeLoader):
    name = "nifti"
    extensions = (".nii", ".nii.gz")

    @classmethod
    def sniff(cls, path: Path) -> bool:
        try:
            with gzip.open(path, "rb") if path.read_bytes()[:2] == b"\x1f\x8b" else open(path, "rb") as f:
                header = f.read(348)
        except OSError:
            return False
        return len(header) == 348 and header[344:347] in (b"n+1", b"ni1", b"n+2")

    def load(self, path: str | Path) -> Volume:
        try:
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:
            raise DataError(
                path, f"corrupt or truncated NIfTI ({exc.__class__.__name__}: {exc})".replace("\n", " ")
            ) from None
        return Volume(data, img.affine, str(path), {"format": "nifti"})
