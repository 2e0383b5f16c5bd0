"""Resource limits on what a scan may cost before it is read, for the CLI and the server alike.

Three limits, each set by an environment variable (a plain number, or with a ``K``/``M``/``G``
suffix in powers of 1024), read when a scan is read, so ``mlflow models serve`` and every
``anomaly3d`` command obey the same settings:

=========================  ============================  ==========================================
limit                      variable                      default
=========================  ============================  ==========================================
voxels a header may claim  ``ANOMALY3D_MAX_VOXELS``      134217728 (``128M``: 512 x 512 x 512)
bytes read from one scan   ``ANOMALY3D_MAX_BYTES``       1073741824 (``1G``, after decompression)
voxels of the working      ``ANOMALY3D_MAX_GRID_VOXELS`` 16777216 (``16M``: e.g. 256 x 256 x 256)
grid after resampling
=========================  ============================  ==========================================

Loaders check a file's header against the first two before any voxel data is read (and stop
decompressing at the size the header declares); the pipeline checks the working grid before it is
allocated, as the preprocessing chain computes it from the header
(:meth:`~anomaly3d_core.preprocess.preprocessing.Preprocessor.working_grid`: each step's ``grid``). :func:`override` sets limits for a block of Python code (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from anomaly3d_core.errors import ConfigError, DataError

ENV = {
    "max_voxels": "ANOMALY3D_MAX_VOXELS",
    "max_bytes": "ANOMALY3D_MAX_BYTES",
    "max_grid_voxels": "ANOMALY3D_MAX_GRID_VOXELS",
}
MIN_GRID_AXIS = 4  # a working grid thinner than this along any axis has nothing to score
EXTERNAL_DATA_ENV = "ANOMALY3D_ALLOW_EXTERNAL_DATA"  # 1: a header may name data files outside its folder
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Limits:
    max_voxels: int = 1 << 27
    max_bytes: int = 1 << 30
    max_grid_voxels: int = 1 << 24


_overrides: dict[str, int] = {}


def parse_size(name: str, text: str) -> int:
    """``"1073741824"``, ``"1G"``, ``"512M"`` -> bytes (or a count); a clear error otherwise."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = _SUFFIX.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in _SUFFIX else raw
    try:
        value = int(float(number) * factor)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}: '{text}' is not a positive number (e.g. 1073741824, 1G or 512M)")
    return value


def current() -> Limits:
    """The limits in force: :func:`override` values, else the environment, else the defaults."""
    values: dict[str, Any] = {}
    for field, var in ENV.items():
        if field in _overrides:
            values[field] = _overrides[field]
        elif os.environ.get(var, "").strip():
            values[field] = parse_size(var, os.environ[var])
    return replace(Limits(), **values)


@contextlib.contextmanager
def override(**values: int) -> Iterator[Limits]:
    """Set limits (``max_voxels=..., max_bytes=..., max_grid_voxels=...``) inside a ``with`` block."""
    unknown = set(values) - set(ENV)
    if unknown:
        raise ConfigError(f"unknown limit(s) {sorted(unknown)}; known: {', '.join(ENV)}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield current()
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_claim(path: str | Path | None, shape: Sequence[int], itemsize: int, extra_bytes: int = 0) -> None:
    """Refuse a scan whose header claims more voxels or bytes than the limits allow (nothing read yet)."""
    lim = current()
    voxels = math.prod(int(s) for s in shape)
    if voxels > lim.max_voxels:
        raise DataError(
            path,
            f"header claims {_shape_text(shape)} = {voxels:,} voxels, above the limit of {lim.max_voxels:,} "
            f"({ENV['max_voxels']}); refused before reading any data",
        )
    total = voxels * int(itemsize) + int(extra_bytes)
    if total > lim.max_bytes:
        raise DataError(
            path,
            f"header claims {total:,} bytes of data, above the limit of {lim.max_bytes:,} "
            f"({ENV['max_bytes']}); refused before reading any data",
        )


def check_array(path: str | Path | None, shape: Sequence[int]) -> None:
    """Refuse an in-memory array with more voxels than ``max_voxels`` (for loaders without a header check)."""
    lim = current()
    voxels = math.prod(int(s) for s in shape)
    if voxels > lim.max_voxels:
        raise DataError(
            path,
            f"{_shape_text(shape)} = {voxels:,} voxels, above the limit of {lim.max_voxels:,} ({ENV['max_voxels']})",
        )


def check_grid(path: str | Path | None, grid: Sequence[int], spacing: Sequence[float] | None = None) -> None:
    """Refuse a working grid (after resampling) larger than ``max_grid_voxels``, before it is allocated."""
    lim = current()
    voxels = math.prod(int(s) for s in grid)
    if min(int(s) for s in grid) < MIN_GRID_AXIS:
        size = f" of {' x '.join(f'{s:g}' for s in spacing)} mm voxels" if spacing is not None else ""
        raise DataError(
            path,
            f"the scan{size} resamples to a {_shape_text(grid)} grid, under {MIN_GRID_AXIS} voxels along an "
            "axis: too small to score; check the file's voxel size",
        )
    if voxels > lim.max_grid_voxels:
        size = f" from voxels of {' x '.join(f'{s:g}' for s in spacing)} mm" if spacing is not None else ""
        raise DataError(
            path,
            f"resampling{size} would make a {_shape_text(grid)} grid = {voxels:,} voxels, above the limit of "
            f"{lim.max_grid_voxels:,} ({ENV['max_grid_voxels']}); check the file's voxel size or raise the limit",
        )


_untrusted: ContextVar[bool] = ContextVar("anomaly3d_untrusted_input", default=False)


@contextlib.contextmanager
def untrusted_input() -> Iterator[None]:
    """Mark the reads inside the block as of a request's payload: a loader then follows no reference
    to another file (a detached header's data file), whatever the environment allows."""
    token = _untrusted.set(True)
    try:
        yield
    finally:
        _untrusted.reset(token)


def reading_untrusted() -> bool:
    """Whether the current read is of a request's payload (see :func:`untrusted_input`)."""
    return _untrusted.get()


def external_data_allowed() -> bool:
    """Whether a local file's header may name data files outside its own folder (``ANOMALY3D_ALLOW_EXTERNAL_DATA=1``)."""
    return not reading_untrusted() and os.environ.get(EXTERNAL_DATA_ENV, "").strip() == "1"
