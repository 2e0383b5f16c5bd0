"""Reading NIfTI-1/2 (``.nii``, ``.nii.gz``, or their bytes) within the limits of :mod:`.limits`.

The header is read and checked first; then exactly the bytes it declares are read (decompressed),
and never more: a header that claims a huge volume is refused before any data is read, and a gzip
stream that expands beyond what the header declares is never decompressed past that point.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path
from typing import IO

import nibabel as nib
import numpy as np

from anomaly3d_core.errors import DataError
from anomaly3d_core.io import limits

_KINDS = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
_STREAM_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile)


def _open(source: str | Path | bytes) -> IO[bytes]:
    raw: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes | bytearray) else open(source, "rb")
    magic = raw.read(2)
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw


def _corrupt(name: str | Path | None, reason: str) -> DataError:
    return DataError(name, f"corrupt or truncated NIfTI ({reason})".replace("\n", " "))


def _read_into(stream: IO[bytes], buf: bytearray, start: int) -> int:
    """Fill ``buf`` from ``start`` with what the stream holds; returns how far it got."""
    view, pos = memoryview(buf), start
    while pos < len(buf):
        n = stream.readinto(view[pos : min(len(buf), pos + (1 << 24))])
        if not n:
            break
        pos += n
    return pos


def read_nifti(source: str | Path | bytes, name: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxel data and affine of a NIfTI file, or of the file's bytes, within the limits.

    Reads the header, checks what it claims, then reads exactly the declared bytes into one buffer
    that becomes the array (no second copy); anything after them is never read or inflated.
    """
    name = source if name is None and not isinstance(source, bytes | bytearray) else name
    try:
        stream = _open(source)
    except OSError as exc:
        raise DataError(name, f"cannot be opened ({exc.strerror or exc})") from None
    with stream:
        try:
            head = stream.read(4)
            if len(head) < 4:
                raise _corrupt(name, f"{len(head)} bytes, shorter than a NIfTI header")
            size = next((s for fmt in "<>" if (s := struct.unpack(fmt + "i", head)[0]) in _KINDS), None)
            if size is None:
                raise DataError(name, "not a NIfTI file (its header size field is neither 348 nor 540)")
            header_klass = _KINDS[size]
            block = head + stream.read(size - 4)
            if len(block) < size:
                raise _corrupt(name, f"header cut short at {len(block)} of {size} bytes")
            try:
                header = header_klass(block, check=False)
                shape = tuple(int(s) for s in header.get_data_shape())
                dtype = header.get_data_dtype()
                offset = int(header["vox_offset"])
            except Exception as exc:
                raise _corrupt(name, f"invalid header: {exc.__class__.__name__}: {exc}") from None
            start = max(offset, size + 4)  # single-file NIfTI: 4 extension-flag bytes after the header
            limits.check_claim(name, shape, dtype.itemsize, extra_bytes=start)
            total = start + math.prod(shape) * dtype.itemsize
            buf = bytearray(total)
            buf[:size] = block
            got = _read_into(stream, buf, size)
        except _STREAM_ERRORS as exc:
            raise _corrupt(name, f"{exc.__class__.__name__}: {exc}") from None
    if got < total:
        raise _corrupt(name, f"the header declares {total:,} bytes, the file holds {got:,}")
    try:
        data: np.ndarray = np.ndarray(shape, dtype=dtype, buffer=buf, offset=start, order="F")
        slope, inter = header.get_slope_inter()
        if slope is not None and (slope, inter or 0.0) != (1.0, 0.0):
            data = data * np.float32(slope) + np.float32(inter or 0.0)
        return data, header.get_best_affine()
    except Exception as exc:
        raise _corrupt(name, f"{exc.__class__.__name__}: {exc}") from None


def nifti_image(source: str | Path | bytes, name: str | Path | None = None) -> nib.Nifti1Image:
    """A NIfTI image (data in memory) read from a file or its bytes, within the limits."""
    data, affine = read_nifti(source, name)
    return nib.Nifti1Image(data, affine)
