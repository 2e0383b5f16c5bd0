"""The array operations of the preprocessing steps: resampling, foreground, normalisation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.filters import threshold_otsu


def each_channel(fn: Callable[[np.ndarray], np.ndarray], arr: np.ndarray) -> np.ndarray:
    """Apply ``fn`` to each 3D channel of a channel-last array (or to a 3D array)."""
    if arr.ndim == 3:
        return fn(arr)
    return np.stack([fn(arr[..., c]) for c in range(arr.shape[3])], axis=-1)


def resize(array: np.ndarray, shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    """Resample to ``shape``: trilinear (``order=1``) for images, nearest (``order=0``) for masks.

    Voxel centres are mapped with ``align_corners=False``, matching :func:`resized_affine`.
    """
    if tuple(array.shape) == tuple(shape):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if order == 0:
        out = F.interpolate(t, size=tuple(shape), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def resized_affine(affine: np.ndarray, old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> np.ndarray:
    """The affine of ``old_shape`` resampled to ``new_shape`` over the same field of view."""
    scale = np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1.0) / 2.0
    return affine @ step


def foreground_mask(array: np.ndarray, method: str) -> np.ndarray:
    """The foreground of a 3D array: ``nonzero``, ``otsu`` (holes filled) or ``none`` (everything)."""
    if method == "none":
        return np.ones(array.shape, dtype=bool)
    if method == "otsu":
        mask = array > threshold_otsu(array)
        return ndimage.binary_fill_holes(mask)
    # "nonzero" tolerates the tiny values that resampling leaves next to an exact-zero background
    return np.abs(array) > 1e-6 * float(np.abs(array).max())


def normalize(
    array: np.ndarray, mask: np.ndarray, method: str, clip: tuple[float, float] | None
) -> np.ndarray:
    """Normalise with robust statistics taken inside ``mask``; the background gets the lowest value.

    ``clip`` percentiles bound the values the statistics are computed from; the data itself is
    not clipped, so a lesion brighter than any normal tissue keeps its contrast.
    """
    values = array[mask]
    out = array.astype(np.float32, copy=True)
    if clip is not None:
        lo, hi = np.percentile(values, clip)
        values = values[(values >= lo) & (values <= hi)]
    if method == "z_score":
        std = float(values.std())
        out = (out - float(values.mean())) / (std if std > 0 else 1.0)
    elif method in ("min_max", "percentile"):
        # min_max: the (robust) extremes map to 0 and 1; percentile: the clip percentiles do
        lo, hi = (
            (float(values.min()), float(values.max()))
            if method == "min_max"
            else np.percentile(array[mask], clip or (1.0, 99.0))
        )
        out = (out - lo) / ((hi - lo) or 1.0)
    if method != "none":
        out[~mask] = out[mask].min()
    return out.astype(np.float32)
