"""Seed-style data API and batch loading that reports bad files instead of stopping."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.config import PreprocessingConfig
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.files import check_volume, list_inputs, load_volume
from anomaly3d_core.io.subjects import Subject, find_subjects, is_bids_root
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.augmentation import augment_volume
from anomaly3d_core.preprocess.preprocessing import Preprocessor

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


def load_and_normalize_volume(
    path: str | Path,
    target_shape: tuple[int, int, int] | None = None,
    normalize_method: str = "z_score",
    clip_percentile: tuple[float, float] | None = (1.0, 99.0),
    target_spacing: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Seed API: read a scan, reorient to RAS+, resize and normalise it; returns the array."""
    volume = load_volume(path)
    config = PreprocessingConfig(
        target_shape=target_shape,
        target_spacing=target_spacing,
        normalize_method=normalize_method,  # type: ignore[arg-type]
        clip_percentile=clip_percentile,
        crop_foreground=False,
        pad_multiple=1,
        foreground="nonzero",
    )
    if normalize_method == "none" or _looks_like_mask(volume.array):
        config = config.model_copy(
            update={"normalize_method": "none", "clip_percentile": None, "foreground": "none"}
        )
    return Preprocessor(config)(volume).array


def _looks_like_mask(array: np.ndarray) -> bool:
    values = np.unique(array)
    return values.size <= 2 and set(values.tolist()) <= {0.0, 1.0}


def load_dataset(
    volume_paths: Sequence[str | Path],
    target_shape: tuple[int, int, int] | None = None,
    normalize_method: str = "z_score",
    clip_percentile: tuple[float, float] | None = (1.0, 99.0),
    apply_augmentation: bool = False,
    seed: int = 0,
    **augmentation: Any,
) -> list[np.ndarray]:
    """Seed API: load, normalise and optionally augment several scans; bad files are skipped with a warning."""
    failures = BatchFailures()
    rng = np.random.default_rng(seed)
    out = []
    for path in volume_paths:
        try:
            array = load_and_normalize_volume(path, target_shape, normalize_method, clip_percentile)
        except DataError as exc:
            failures.add(exc)
            continue
        out.append(augment_volume(array, rng=rng, **augmentation) if apply_augmentation else array)
    if not out:
        raise DataError(
            None, f"none of the {len(volume_paths)} volumes could be loaded:\n{failures.report()}"
        )
    return out


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
