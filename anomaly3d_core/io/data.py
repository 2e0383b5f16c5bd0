"""Seed-style data API and batch loading that reports bad files instead of stopping."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.errors import DataError
from anomaly3d_core.io.files import check_volume, list_inputs, load_volume
from anomaly3d_core.io.subjects import Subject, find_subjects, is_bids_root
from anomaly3d_core.io.volume import Volume

log = logging.getLogger(__name__)
#: one scan: a volume, an array, a file; or a subject with several sequences ({"T1w": ..., "FLAIR": ...})
VolumeLike = Volume | np.ndarray | str | Path | Subject | Mapping[str, Any]


@dataclass
class BatchFailures:
    """Files a batch could not use, with the reason for each."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.items.append((error.path or "?", error.reason))
        log.warning("skipped %s: %s", error.path, error.reason)

    def record(self, path: str | Path, error: Exception) -> None:
        """Add any exception raised for ``path``: one bad file never stops a batch, whatever it raises."""
        if isinstance(error, DataError):
            self.add(error)
            return
        log.debug("unexpected error for %s", path, exc_info=error)
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"unexpected {type(error).__name__}" + (f": {text}" if text else "")
        self.add(DataError(path, reason + " (rerun with --debug for the traceback)"))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def report(self) -> str:
        return "\n".join(f"  {path}: {reason}" for path, reason in self.items)


def as_volume(item: VolumeLike, loader: str = "auto", registry: Any = None) -> Volume:
    """Accept a :class:`Volume`, an array (identity affine) or a path."""
    if isinstance(item, Volume):
        return item
    if isinstance(item, np.ndarray):
        return check_volume(Volume.from_array(item))
    return load_volume(item, loader, registry)


@dataclass
class Inputs:
    """What a command works through: files (one sequence) or subjects, and the subjects refused while grouping."""

    items: list[Any]
    errors: list[DataError] = field(default_factory=list)
    bids_root: Path | None = None


def list_items(spec: str | Path, channels: Sequence[str], registry: Any = None) -> Inputs:
    """Files for a one-file-per-scan model (``channels`` empty), subjects otherwise."""
    if not channels:
        p = Path(spec)
        if is_bids_root(p) and not any(p.glob("*.nii*")):
            raise DataError(
                p,
                "a BIDS dataset: set data.sequences (e.g. --set 'data.sequences=[T1w]') to read its subjects",
            )
        return Inputs(list(list_inputs(spec, registry)))
    subjects, errors, root = find_subjects(spec, channels)
    if not subjects:
        raise DataError(spec, "no usable subject:\n" + "\n".join(f"  {e}" for e in errors))
    return Inputs(list(subjects), errors, root)
