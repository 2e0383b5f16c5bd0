"""FreeSurfer MGH volumes (``.mgh``, and gzipped ``.mgz``) through nibabel, within anomaly3d's limits.

The fixed-size header (big-endian: version, width, height, depth, frames, type) is read first and
what it claims is checked against ``ANOMALY3D_MAX_VOXELS``/``ANOMALY3D_MAX_BYTES`` before nibabel
reads any voxel data.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import VolumeLoader
from anomaly3d_core.io import limits
from anomaly3d_core.io.volume import Volume

_ITEMSIZE = {0: 1, 1: 4, 3: 4, 4: 2}  # MGH type codes: uchar, int32, float32, int16


class MghLoader(VolumeLoader):
    """FreeSurfer's MGH format (``orig.mgz``, ``brain.mgz``, ...)."""

    name = "mgh"
    api_version = 1
    extensions = (".mgz", ".mgh")

    @classmethod
    def example_file(cls, folder: Path) -> list[Path]:
        volume = cls.example_volume()
        paths = []
        for ext in cls.extensions:
            path = Path(folder) / f"example{ext}"
            nib.save(nib.MGHImage(volume.array, volume.affine), str(path))
            paths.append(path)
        return paths

    @classmethod
    def example_volume(cls) -> Volume:
        affine = np.array([[-1.5, 0, 0, 20.0], [0, 0, 1.2, -10.0], [0, -2.0, 0, 15.0], [0, 0, 0, 1]])
        array = (np.arange(7 * 6 * 5, dtype=np.float32).reshape(7, 6, 5) - 50) / 4
        return Volume(array, affine, "example")

    def load(self, path: str | Path) -> Volume:
        path = Path(path)
        self._check_header(path)
        try:
            image = nib.load(str(path))
            data = np.asanyarray(image.dataobj)
        except Exception as exc:
            raise DataError(path, f"corrupt or unreadable MGH file ({type(exc).__name__}: {exc})") from None
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        data = np.asarray(data)
        data = data.astype(data.dtype.newbyteorder("="), copy=False)  # MGH stores big-endian
        return Volume(data, image.affine, str(path), {"format": "mgh"})

    @staticmethod
    def _check_header(path: Path) -> None:
        try:
            with open(path, "rb") as raw:
                gzipped = raw.read(2) == b"\x1f\x8b"
            with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
                head = f.read(28)
        except (OSError, EOFError) as exc:
            raise DataError(path, f"corrupt or unreadable MGH file ({exc})") from None
        if len(head) < 28:
            raise DataError(path, "not an MGH file (header too short)")
        version, *shape, kind = struct.unpack(">7i", head)
        if version != 1 or kind not in _ITEMSIZE or min(shape) < 1:
            raise DataError(path, f"not an MGH file (version {version}, type {kind}, shape {shape})")
        limits.check_claim(path, shape, _ITEMSIZE[kind])
