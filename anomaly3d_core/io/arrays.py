"""Arrays and archives read within the limits: a header's claim is checked before any data is inflated.

Scans, a model folder's ``normative.npz`` and its ``weights.pt`` (a zip archive) all pass through
here, so a small file that claims gigabytes is refused before it costs them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from anomaly3d_core.errors import DataError
from anomaly3d_core.io import limits


def check_npy_header(f: IO[bytes], path: str | Path) -> tuple[int, ...]:
    """The shape in a ``.npy`` header, refused when it claims more than the limits allow."""
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    except Exception as exc:
        raise DataError(path, f"corrupt or truncated NumPy file ({exc.__class__.__name__}: {exc})") from None
    limits.check_claim(path, shape, dtype.itemsize)
    return tuple(int(s) for s in shape)


def check_archive(path: str | Path) -> None:
    """Refuse a zip archive whose members together claim more bytes than ``ANOMALY3D_MAX_BYTES``.

    Readers (NumPy, PyTorch) allocate what a member's entry declares, so the declared sizes bound
    what reading can cost.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(path, f"not a readable archive ({exc})") from None
    cap = limits.current().max_bytes
    if total > cap:
        raise DataError(
            path,
            f"archive inflates to {total:,} bytes, above the limit of {cap:,} ({limits.ENV['max_bytes']}); "
            "refused before reading any data",
        )


def load_npz(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` archive (no pickles), each header checked before its data is read."""
    check_archive(path)
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [k for k in keys if f"{k}.npy" not in archive.namelist()]
            if missing:
                raise DataError(path, f"archive lacks the array(s) {', '.join(missing)}")
            for key in keys:
                with archive.open(f"{key}.npy") as member:
                    check_npy_header(member, path)
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in keys}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, f"corrupt archive ({exc.__class__.__name__}: {exc})") from None


def read_text(path: str | Path, max_bytes: int = 64 << 20) -> str:
    """A small text file of a model folder (``state.json``, ...), its size checked before it is read."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise DataError(path, f"{size:,} bytes, above the {max_bytes:,} a model's text file may hold")
    return Path(path).read_text()
