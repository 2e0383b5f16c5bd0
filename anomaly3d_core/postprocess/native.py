"""From the prepared grid back to the scan's own grid: the one place where score maps are mapped back."""

from __future__ import annotations

import numpy as np

from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.preprocessing import Prepared, Preprocessor, PreprocessRecord, foreground_mask


def to_native(scores: np.ndarray, prep: Prepared, foreground: str) -> tuple[np.ndarray, np.ndarray]:
    """Prepared-grid scores on the input's grid, zero outside its own foreground, and that foreground."""
    native = Preprocessor.invert(scores, prep.record, order=1)
    # interpolation back to the native grid must not leak scores outside the scan's own foreground
    fg = foreground_mask(prep.source.channel(0), foreground)  # a subject's reference sequence
    native[~fg] = 0.0
    return native, fg


def mask_to_native(mask: np.ndarray, prep: Prepared) -> np.ndarray:
    """A binary mask on the prepared grid, on the input's grid (nearest neighbour)."""
    return Preprocessor.invert(mask.astype(np.float32), prep.record, order=0) > 0.5


def native_prepared(volume: Volume, foreground: str) -> Prepared:
    """The input itself as a 'prepared' scan: for detectors (ensembles) that work on the native grid."""
    shape = tuple(int(s) for s in volume.shape)
    record = PreprocessRecord(shape, np.asarray(volume.affine).tolist(), [])  # type: ignore[arg-type]  # no step
    array = np.asarray(volume.array, dtype=np.float32)
    fg = foreground_mask(volume.channel(0), foreground)
    return Prepared(
        np.moveaxis(array, -1, 0) if array.ndim == 4 else array, fg, np.asarray(volume.affine), record, volume
    )
