"""Finding inputs, choosing a loader, checking volumes, naming outputs and writing results atomically.

Every write goes to a temporary sibling (a hidden ``.NAME.*`` file or folder, never picked up as
an input) and is renamed into place, with the permissions the umask gives; a folder is replaced
whole (:func:`replace_tree`), under a lock that a second writer finds taken (:func:`write_lock`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from anomaly3d_core.errors import Anomaly3DError, DataError, PluginError
from anomaly3d_core.io import limits
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.registry import get_registry

try:  # POSIX advisory locks; elsewhere writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


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


MIN_VOXEL_MM = 0.01  # a smaller voxel is a broken header (or wrong units), not a scan
MAX_INTENSITY = 1e12  # far beyond any scanner's values; their sums overflow 32-bit floats (3.4e38)
#: the other end: far below any scanner's values (ADC in m²/s is ~1e-9); squares of values under ~1e-19
#: underflow 32-bit floats (smallest normal 1.2e-38), so spreads and normalisation lose their meaning
MIN_INTENSITY = 1e-15


def check_volume(volume: Volume, allow_constant: bool = False) -> Volume:
    """Reject data that cannot be a 3D scan; squeeze a singleton 4th axis.

    ``allow_constant`` accepts an all-equal volume (an empty ground-truth mask).
    """
    arr = np.asarray(volume.array)
    limits.check_array(volume.path, arr.shape)
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
    if max(abs(lo), abs(hi)) > MAX_INTENSITY:
        raise DataError(
            volume.path,
            f"intensities reach {max(abs(lo), abs(hi)):.3g}, beyond {MAX_INTENSITY:g}: at the edge of 32-bit "
            "floating point, where resampling and normalisation overflow; rescale the scan's intensities",
        )
    if not allow_constant:
        _check_contrast(volume.path, arr, lo, hi)
    if not np.all(np.isfinite(volume.affine)) or abs(np.linalg.det(volume.affine[:3, :3])) < 1e-12:
        raise DataError(volume.path, "affine is singular or not finite; the file's geometry is broken")
    spacing = np.sqrt((np.asarray(volume.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    if spacing.min() < MIN_VOXEL_MM:  # too large ones meet the working-grid limit when resampled
        raise DataError(
            volume.path,
            f"voxel size {' x '.join(f'{v:.4g}' for v in spacing)} mm is below {MIN_VOXEL_MM:g} mm: the "
            "header's geometry is wrong (check its pixdim/spacing and units)",
        )
    volume.array = arr
    return volume


def _check_contrast(path: Any, arr: np.ndarray, lo: float, hi: float) -> None:
    """Refuse a scan without tissue contrast to analyse: constant, a constant foreground on a constant
    background (two intensities), or intensities so small that normalisation underflows."""
    if lo == hi:
        raise DataError(path, f"constant volume (every voxel is {lo:g}); nothing to analyse")
    peak = max(abs(lo), abs(hi))
    if peak < MIN_INTENSITY:
        raise DataError(
            path,
            f"intensities reach at most {peak:.3g}, below {MIN_INTENSITY:g}: so small that normalisation is "
            "meaningless (their squares underflow 32-bit floating point); rescale the scan's intensities",
        )
    if np.all((arr == lo) | (arr == hi)):
        what = (
            f"constant foreground intensity (every non-zero voxel is {hi if lo == 0 else lo:g})"
            if 0.0 in (lo, hi)
            else f"only two intensities ({lo:g} and {hi:g})"
        )
        raise DataError(path, f"{what}: no tissue contrast (a mask, not a scan?); nothing to analyse")


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
        raise DataError(p, missing_reason(p))
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


def missing_reason(path: Path) -> str:
    """Why ``path`` cannot be opened: not there, a broken link, a link loop, no permission."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself); fix or remove the link"
        if path.is_symlink():
            return f"broken symbolic link (it points to '{os.readlink(path)}', which does not exist)"
        if exc.errno == errno.EACCES:
            return "permission denied (the file or a folder above it is not readable)"
        if exc.errno == errno.ENOENT:
            return "file not found"
        return f"cannot be opened ({exc.strerror})"
    return "file not found"


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
        reason = missing_reason(p)
        raise DataError(p, "no such file or folder" if reason == "file not found" else reason)
    if p.is_file():
        return [p]
    extensions = set(loader_extensions(registry)) | set(_SCAN_SUFFIXES)
    files, dicom_dirs = [], []
    for child in sorted(p.iterdir()):
        name = child.name.lower()
        if name.startswith("."):  # hidden: temporary files of an interrupted write, editor files
            continue
        if child.is_dir():
            try:
                entries = [f for f in child.iterdir() if f.is_file() and not f.name.startswith(".")]
            except OSError:
                entries = []
            if any(f.suffix.lower() == ".dcm" or f.suffix == "" for f in entries):
                dicom_dirs.append(child)
        elif name.endswith(".dcm") or child.suffix == "":
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


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` and rename into place, so no half-written file is ever seen.

    The file gets the permissions the umask gives a new file (``0644`` under the usual ``022``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_held_locks: set[str] = set()
_held_guard = threading.Lock()


@contextlib.contextmanager
def write_lock(target: str | Path, what: str = "folder", blocking: bool = False) -> Iterator[None]:
    """Hold ``.TARGET.lock`` next to ``target``; a second process that asks gets a clear error at once
    (or, with ``blocking``, waits its turn).

    Re-entrant within one process. The lock is released when the process ends, however it ends,
    and its file is removed on release.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    key = str(lock_path.resolve())
    with _held_guard:
        reentrant = key in _held_locks
        _held_locks.add(key)
    if reentrant:
        yield
        return
    fd = -1
    try:
        while fcntl is not None:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                fd = -1
                raise Anomaly3DError(
                    f"{target}: another process is writing this {what} now (lock {lock_path.name} is held); "
                    "wait for it to finish or choose another path"
                ) from None
            try:  # the holder before us may have removed the file: lock the one that is there now
                if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
            fd = -1
        yield
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            os.close(fd)  # closing releases the flock
        with _held_guard:
            _held_locks.discard(key)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_tree(dest: str | Path, build: Callable[[Path], Any], what: str = "folder") -> Path:
    """Build a folder with ``build(new_path)`` next to ``dest`` and swap it in whole.

    ``dest`` is replaced only by a complete new folder: until the swap the old one is untouched,
    and the swap is one atomic rename exchange (two renames a moment apart where the system lacks
    it). Runs under :func:`write_lock`; leftovers of an interrupted earlier write are removed.
    """
    dest = Path(dest)
    with write_lock(dest, what):
        parent = dest.parent
        for stale in list(parent.glob(f".{dest.name}.tmp-*")) + list(parent.glob(f".{dest.name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
        try:
            new = work / dest.name
            build(new)
            if not new.exists():
                raise Anomaly3DError(f"{dest}: nothing was written")
            if os.path.lexists(dest):
                if not _exchange(new, dest):
                    old = parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
                    os.rename(dest, old)
                    os.rename(new, dest)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(new, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and make sure files can be written there; one clear error otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise Anomaly3DError(f"{option} {p}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise Anomaly3DError(f"{option} {p}: cannot write there ({exc.strerror or exc})") from None
    return p


def check_model_target(path: str | Path, option: str = "--out") -> Path:
    """A model folder can be written at ``path``: new, empty or an anomaly3d model, in a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise Anomaly3DError(f"{option} {p}: exists and is not a folder")
    model = any((p / name).is_file() for name in ("MLmodel", "config.yaml", "ensemble.json"))
    if p.is_dir() and not model and any(p.iterdir()):
        raise Anomaly3DError(f"{p}: exists and is not an anomaly3d model folder; choose an empty or new path")
    check_output_dir(p.parent, option=f"{option} {p}: its parent")
    return p


def loader_extensions(registry: Any = None) -> list[str]:
    """Every registered loader's file extensions, longest first (``.nii.gz`` before ``.nii``)."""
    reg = _registry(registry)
    exts = {ext.lower() for info in reg.infos("loaders") for ext in info.cls.extensions}
    return sorted(exts, key=lambda e: (-len(e), e))


def scan_stem(path: str | Path, registry: Any = None) -> str:
    """A scan's name without its loader's extension (``sub.01.nii.gz`` -> ``sub.01``, ``x.mgz`` -> ``x``),
    as the loader's ``output_stem`` gives it."""
    name = Path(path).name
    low = name.lower()
    best: tuple[int, Any] | None = None  # the loader whose extension matches longest names the outputs
    for info in _registry(registry).infos("loaders"):
        for ext in info.cls.extensions:
            if low.endswith(ext.lower()) and len(name) > len(ext) and (best is None or len(ext) > best[0]):
                best = (len(ext), info.cls)
    return best[1].output_stem(Path(path)) if best else name


def output_stems(paths: Sequence[str | Path | Subject], registry: Any = None) -> list[str]:
    """One unique output stem per input, the only rule for naming outputs (``STEM_score.nii.gz``, ...).

    The stem is the input's name without its loader's extension. Inputs whose stems clash (same
    name in different folders, e.g. ``a/sub.nii.gz`` and ``b/sub.nii.gz`` or two DICOM folders
    ``p1/series`` and ``p2/series``) keep their path under the inputs' common folder instead
    (``a/sub``, ``b/sub``); a clash that remains (``sub.nii`` next to ``sub.nii.gz``) refuses the
    batch, naming both files, before anything is scored.
    """
    stems = [p.stem if isinstance(p, Subject) else scan_stem(p, registry) for p in paths]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, stem in enumerate(stems):
        groups[stem.casefold()].append(i)
    clashing = [i for group in groups.values() if len(group) > 1 for i in group]
    if clashing and not any(isinstance(p, Subject) for p in paths):
        parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
        root = os.path.commonpath(parents)
        for i in clashing:
            rel = os.path.relpath(parents[i], root)
            stems[i] = stems[i] if rel == "." else Path(rel, stems[i]).as_posix()
    seen: dict[str, int] = {}
    for i, stem in enumerate(stems):
        j = seen.setdefault(stem.casefold(), i)
        if j != i:
            raise Anomaly3DError(
                f"{paths[j]} and {paths[i]} would write the same outputs ('{stem}_score.nii.gz'); "
                "rename one of them or score them in separate runs"
            )
    return stems


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` with ``affine`` as NIfTI (sform and qform set), atomically."""
    data = np.asarray(array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


def output_path(out_dir: str | Path, name: str) -> Path:
    """``out_dir / name`` for a name derived from input (a subject, a file stem, BIDS entities), refused
    unless it stays inside ``out_dir``: no absolute path, no ``..``, no link that leads out."""
    out = Path(out_dir)
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\0" in name:
        raise DataError(
            name, f"an output name derived from the input would be written outside {out}; refused"
        )
    target = out / rel
    root = out.resolve()
    if not target.parent.resolve().is_relative_to(root):
        raise DataError(
            name, f"an output name derived from the input leads outside {out} (through a link); refused"
        )
    return target
