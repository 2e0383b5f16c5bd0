"""NumPy arrays (``.npy``, ``.npz``), with the affine from a sidecar when there is one.

Sidecars, first found wins: ``<stem>.affine.npy`` (a 4x4 array), ``<stem>.json`` with an
``"affine"`` key, or an ``affine`` array inside the ``.npz``. Without one the identity
(1 mm isotropic) is used, and a warning says so. Pickled arrays are refused, and the shape in
each array's header is checked against the reading limits before its data is read.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import VolumeLoader
from anomaly3d_core.io.arrays import check_npy_header
from anomaly3d_core.io.volume import Volume
from anomaly3d_plugins.loaders import examples

_NPY_MAGIC = b"\x93NUMPY"


class NumpyLoader(VolumeLoader):
    name = "numpy"
    extensions = (".npy", ".npz")

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """A ``.npy`` header, or a zip archive holding ``.npy`` members (``.npz``)."""
        try:
            with open(path, "rb") as f:
                if f.read(6) == _NPY_MAGIC:
                    return True
            if not zipfile.is_zipfile(path):
                return False
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            return bool(names) and all(n.endswith(".npy") for n in names)
        except (OSError, zipfile.BadZipFile):
            return False

    @classmethod
    def example_file(cls, folder: Path) -> list[Path]:
        volume, folder = examples.example_volume(), Path(folder)
        np.save(folder / "example.npy", volume.array)
        np.save(folder / "example.affine.npy", volume.affine)  # the sidecar
        np.savez(folder / "example_archive.npz", volume=volume.array, affine=volume.affine)
        return [folder / "example.npy", folder / "example_archive.npz"]

    @classmethod
    def example_volume(cls) -> Volume:
        return examples.example_volume()

    def load(self, path: str | Path) -> Volume:
        path = Path(path)
        stem = self.output_stem(path)
        affine = None
        try:
            if path.suffix.lower() == ".npz" or _is_zip(path):
                with np.load(path, allow_pickle=False) as npz:
                    keys = [k for k in npz.files if k != "affine"]
                    if not keys:
                        raise DataError(path, "archive holds no array")
                    key = "volume" if "volume" in keys else keys[0]
                    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
                        check_header(member, path)
                    data = npz[key]
                    if "affine" in npz.files:
                        affine, source = npz["affine"], "the 'affine' array in the archive"
            else:
                with open(path, "rb") as f:
                    check_header(f, path)
                data = np.load(path, allow_pickle=False)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                path, f"corrupt or truncated NumPy file ({exc.__class__.__name__}: {exc})"
            ) from None
        if affine is None:
            affine, source = self._sidecar(path.parent, stem)
        if affine is None:
            warnings.warn(
                f"{path}: no affine sidecar ({stem}.affine.npy or {stem}.json); using identity (1 mm voxels)",
                stacklevel=2,
            )
            affine, source = np.eye(4), "identity"
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise DataError(path, f"affine from {source} has shape {affine.shape}; expected 4x4")
        return Volume(data, affine, str(path), {"format": "numpy", "affine_source": source})

    @staticmethod
    def _sidecar(folder: Path, stem: str) -> tuple[np.ndarray | None, str]:
        npy = folder / f"{stem}.affine.npy"
        if npy.is_file():
            with open(npy, "rb") as f:
                shape = check_header(f, npy)
            if shape != (4, 4):
                raise DataError(npy, f"affine sidecar has shape {shape}; expected 4x4")
            return np.load(npy, allow_pickle=False), str(npy)
        js = folder / f"{stem}.json"
        if js.is_file():
            try:
                meta = json.loads(js.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(js, f"sidecar is not valid JSON ({exc})") from None
            if "affine" in meta:
                return np.array(meta["affine"], dtype=np.float64), str(js)
        return None, "identity"


def _is_zip(path: Path) -> bool:
    """An ``.npz`` by content, whatever the file is called (the server names its copies itself)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def check_header(f: IO[bytes], path: Path) -> tuple[int, ...]:
    """The shape in a ``.npy`` header, refused when it claims more than the limits allow."""
    return check_npy_header(f, path)
