"""Finding inputs, choosing a loader, checking volumes and writing results atomically."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from anomaly3d_core.errors import DataError, PluginError
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.registry import get_registry


def _registry(registry: Any) -> Any:
    if registry is not None:
        return registry
    return get_registry()


def find_loader(path: str | Path, name: str = "auto", registry: Any = None) -> Any:
    """The loader class for ``path``: by name, else by extension, else by content."""
    reg = _registry(registry)
    if name != "auto":
        try:
            return reg.get("loaders", name)
        except PluginError as exc:
            raise DataError(path, str(exc)) from None
    p = Path(path)
    classes = [info.cls for info in reg.infos("loaders")]
    if p.is_dir():
        for cls in classes:
            if cls.reads_directories and cls.sniff(p):
                return cls
        raise DataError(p, "folder holds no readable series (no DICOM files found)")
    for cls in classes:
        if not cls.reads_directories and cls.matches_extension(p):
            return cls
    for cls in classes:
        if cls.sniff(p):
            return cls
    known = sorted({ext for cls in classes for ext in cls.extensions})
    raise DataError(
        p,
        f"unsupported file type '{''.join(p.suffixes) or p.name}'; supported: {', '.join(known)}, or a DICOM folder",
    )


def check_volume(volume: Volume, allow_constant: bool = False) -> Volume:
    """Reject data that cannot be a 3D scan; squeeze a singleton 4th axis.

    ``allow_constant`` accepts an all-equal volume (an empty ground-truth mask).
    """
    arr = np.asarray(volume.array)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.size == 0:
        raise DataError(volume.path, "empty volume (no voxels)")
    if arr.ndim < 3 or min(arr.shape) == 1:
        raise DataError(volume.path, f"{arr.ndim}D data of shape {arr.shape}; a 3D volume is needed")
    if arr.ndim > 3:
        raise DataError(
            volume.path,
            f"4D data holding {int(np.prod(arr.shape[3:]))} volumes (shape {arr.shape}); give one 3D volume per file",
        )
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DataError(volume.path, f"voxel type {arr.dtype} is not a real number type")
    arr = arr.astype(np.float32, copy=False)
    bad = int(arr.size - np.isfinite(arr).sum())
    if bad:
        raise DataError(volume.path, f"{bad} voxels are NaN or Inf; fix or mask them before scoring")
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi and not allow_constant:
        raise DataError(volume.path, f"constant volume (every voxel is {lo:g}); nothing to analyse")
    if not np.all(np.isfinite(volume.affine)) or abs(np.linalg.det(volume.affine[:3, :3])) < 1e-12:
        raise DataError(volume.path, "affine is singular or not finite; the file's geometry is broken")
    volume.array = arr
    return volume


def load_volume(
    path: str | Path,
    loader: str = "auto",
    registry: Any = None,
    allow_constant: bool = False,
    loader_args: dict[str, Any] | None = None,
) -> Volume:
    """Read one scan with the right loader plugin (and its ``loader_args``) and check it."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file not found")
    cls = find_loader(p, loader, registry)
    try:
        volume = cls(**(loader_args or {})).load(p)
    except DataError:
        raise
    except Exception as exc:  # loaders wrap library errors, but never let one escape raw
        raise DataError(
            p, f"cannot be read as {cls.name} ({exc.__class__.__name__}: {exc})".replace("\n", " ")
        ) from None
    volume.path = str(p)
    return check_volume(volume, allow_constant)


_SCAN_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz", ".nrrd", ".mha", ".mhd", ".dcm")


def list_inputs(spec: str | Path, registry: Any = None) -> list[Path]:
    """Expand a file, a folder (its scans and DICOM sub-folders) or a glob into input paths."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text))]
        if not paths:
            raise DataError(text, "pattern matches no files")
        return paths
    p = Path(text)
    if not p.exists():
        raise DataError(p, "no such file or folder")
    if p.is_file():
        return [p]
    reg = _registry(registry)
    extensions = {ext for info in reg.infos("loaders") for ext in info.cls.extensions} | set(_SCAN_SUFFIXES)
    files, dicom_dirs = [], []
    for child in sorted(p.iterdir()):
        name = child.name.lower()
        if child.is_dir():
            if any(f.suffix.lower() == ".dcm" or f.suffix == "" for f in child.iterdir() if f.is_file()):
                dicom_dirs.append(child)
        elif name.endswith(".dcm") or (child.suffix == "" and not name.startswith(".")):
            dicom_dirs.append(p)
        elif any(name.endswith(ext) for ext in extensions) and not _is_sidecar(name):
            files.append(child)
    paths = sorted(set(files)) + sorted(set(dicom_dirs))
    if not paths:
        raise DataError(
            p, "folder is empty of readable scans (.nii, .nii.gz, .npy, .npz, .nrrd, .mha, .mhd or DICOM)"
        )
    return paths


def _is_sidecar(name: str) -> bool:
    return name.endswith(".affine.npy")


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` and rename into place, so no half-written file is ever seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` with ``affine`` as NIfTI (sform and qform set), atomically."""
    data = np.asarray(array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
