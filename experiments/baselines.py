"""Two reference methods for the benchmark, fitted on the same normal scans.

* ``atlas_zscore``: a voxel-wise normative model. Each scan is z-scored inside its brain; the
  score is |x - mean| / std against the training normals at the same voxel. It needs scans on
  one common grid (true for the demo data, which lies in MNI space; real data needs registration).
* ``intensity_mad``: no training. |I - median| / MAD of the scan's own brain intensities.

Both smooth their maps like the pipeline does and take the 99.5th percentile of the training
normals' brain voxels as their threshold (leave-one-out for the atlas).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from anomaly3d_core.io.volume import Volume
from anomaly3d_core.postprocess.thresholding import volume_score


def _brain(v: Volume) -> np.ndarray:
    return v.array > 0


def _finish(s: np.ndarray, brain: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth like the pipeline does, and zero outside the brain."""
    s = ndimage.gaussian_filter(s, sigma) if sigma else s
    return np.where(brain, s, 0.0).astype(np.float32)


def _zscore(v: Volume) -> np.ndarray:
    b = _brain(v)
    vals = v.array[b]
    return np.where(b, (v.array - vals.mean()) / (vals.std() or 1.0), 0.0).astype(np.float32)


class _Baseline:
    """Shared settings: map smoothing, threshold percentile on normals, volume-score top fraction."""

    def __init__(
        self, smoothing_sigma: float = 1.0, percentile: float = 99.5, top_k_fraction: float = 0.01
    ) -> None:
        self.smoothing_sigma, self.percentile, self.top_k_fraction = (
            smoothing_sigma,
            percentile,
            top_k_fraction,
        )


class AtlasZScore(_Baseline):
    name = "atlas_zscore"

    def fit(self, volumes: Sequence[Volume]) -> AtlasZScore:
        shapes = {v.shape for v in volumes}
        if len(shapes) != 1:
            raise ValueError(f"the atlas baseline needs scans on one grid, got shapes {sorted(shapes)}")
        stack = np.stack([_zscore(v) for v in volumes])
        total, total_sq, n = stack.sum(0), (stack**2).sum(0), len(stack)
        self.mean_ = total / n
        self.std_ = np.sqrt(np.maximum(total_sq / n - self.mean_**2, 0)) + 0.1
        normal = []
        for i, v in enumerate(volumes):  # leave-one-out scores for the threshold
            mean = (total - stack[i]) / (n - 1)
            std = np.sqrt(np.maximum((total_sq - stack[i] ** 2) / (n - 1) - mean**2, 0)) + 0.1
            normal.append(_finish(np.abs(stack[i] - mean) / std, _brain(v), self.smoothing_sigma)[_brain(v)])
        self.threshold_ = float(np.percentile(np.concatenate(normal), self.percentile))
        return self

    def score(self, v: Volume) -> tuple[np.ndarray, float]:
        s = _finish(np.abs(_zscore(v) - self.mean_) / self.std_, _brain(v), self.smoothing_sigma)
        return s, volume_score(s, _brain(v), self.top_k_fraction)


class IntensityMAD(_Baseline):
    name = "intensity_mad"

    def _raw(self, v: Volume) -> np.ndarray:
        b = _brain(v)
        vals = v.array[b]
        med = np.median(vals)
        mad = 1.4826 * np.median(np.abs(vals - med)) or 1.0
        return _finish(np.abs(v.array - med) / mad, b, self.smoothing_sigma)

    def fit(self, volumes: Sequence[Volume]) -> IntensityMAD:
        self.threshold_ = float(
            np.percentile(np.concatenate([self._raw(v)[_brain(v)] for v in volumes]), self.percentile)
        )
        return self

    def score(self, v: Volume) -> tuple[np.ndarray, float]:
        s = self._raw(v)
        return s, volume_score(s, _brain(v), self.top_k_fraction)


class FlairMAD(_Baseline):
    """The FLAIR one-liner: smoothed ``max(0, (FLAIR - median) / MAD)`` inside the brain (``two_sided``: ``|.|``).

    Scores a subject read onto its reference (T1w) grid, the FLAIR as channel ``channel``; the brain
    is the reference's nonzero voxels.
    """

    name = "flair_mad"

    def __init__(self, two_sided: bool = False, channel: int = 1, **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.two_sided, self.channel = two_sided, channel

    def _raw(self, v: Volume) -> np.ndarray:
        brain = v.channel(0) != 0
        x = v.channel(self.channel)
        vals = x[brain]
        med = np.median(vals)
        mad = 1.4826 * np.median(np.abs(vals - med)) or 1.0
        z = (x - med) / mad
        return _finish(np.abs(z) if self.two_sided else np.maximum(z, 0.0), brain, self.smoothing_sigma)

    def fit(self, volumes: Sequence[Volume]) -> FlairMAD:
        self.threshold_ = float(
            np.percentile(np.concatenate([self._raw(v)[v.channel(0) != 0] for v in volumes]), self.percentile)
        )
        return self

    def score(self, v: Volume) -> tuple[np.ndarray, float]:
        s = self._raw(v)
        return s, volume_score(s, v.channel(0) != 0, self.top_k_fraction)
