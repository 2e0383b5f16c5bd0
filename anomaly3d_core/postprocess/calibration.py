"""Calibration with stated error rates: conformal p-values, Benjamini–Hochberg and cluster inference.

Everything here is fitted on *normal* scans that the scoring model never trained on (held-out
normals, or the held-out folds of a cross-fit), and nothing else:

- **scan level**: the conformal p-value ``(1 + #{c_i >= s}) / (n + 1)`` of a scan statistic ``s``
  against the same statistic ``c_1..c_n`` of ``n`` calibration normals. For a new normal scan
  ``P(p <= alpha) <= alpha`` whatever the score (Bates et al., Ann. Stat. 2023); ``p`` can never be
  smaller than ``1 / (n + 1)``, so ``alpha`` needs ``n >= ceil(1 / alpha) - 1`` scans;
- **voxel level**: each voxel's score against the calibration voxels at the same depth from the
  brain's edge (:func:`~anomaly3d_core.postprocess.postprocessor.depth_band`); where scans share a
  grid the normative scores are already z-values at the same place, so one depth-banded null
  covers both routes. Benjamini–Hochberg (:func:`bh_mask`) on these p-values bounds the expected
  fraction of false voxels among those flagged by ``q``;
- **cluster level** (FSL/SPM style): voxels with ``p <= forming_p`` form clusters, each cluster's
  mass (mm³-weighted score excess over the cluster-forming score) is compared with the largest
  cluster mass of each calibration normal. A cluster kept at level ``alpha`` keeps the chance of
  *any* false cluster in a normal scan at most ``alpha`` (family-wise).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

#: the largest calibration scores kept exactly per depth band (p-values below ``TAIL / n`` are exact)
TAIL = 20_000
#: quantile levels kept for the body of each band's null (p-values above ``TAIL / n``, interpolated)
BODY_LEVELS = np.linspace(0.0, 1.0, 2001)
SCAN_STATISTICS = ("max_cluster_mass", "top_k_mean")
_STRUCTURE = np.ones((3, 3, 3), bool)  # 26-neighbour clusters, as the rest of the package


class NonFiniteScoreError(ValueError):
    """A score (voxel or scan) is NaN or infinite: it is reported as a failure, never as a decision."""


def require_finite(values: np.ndarray | float, what: str) -> None:
    """Raise :class:`NonFiniteScoreError` naming ``what`` when any value is NaN or infinite."""
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise NonFiniteScoreError(
            f"{what}: {int(bad.sum())} non-finite value(s) (NaN or inf); no decision is made on them — "
            "check the input's intensities (e.g. values near ±3e38, NaN voxels)"
        )


def min_calibration_scans(alpha: float) -> int:
    """Fewest calibration scans for which the conformal p-value can reach ``alpha``: ``1/(n+1) <= alpha``."""
    return max(1, math.ceil(1.0 / alpha - 1e-9) - 1)


def calibration_warning(n: int, alpha: float) -> str | None:
    """A warning when ``n`` calibration scans cannot support ``alpha`` (``None`` when they can)."""
    need = min_calibration_scans(alpha)
    if n >= need:
        return None
    return (
        f"{n} calibration normal scan(s): the smallest possible p-value is 1/(n+1) = {1 / (n + 1):.3g} "
        f"> alpha {alpha:g}, so scans are decided by the uncalibrated thresholds instead (mask_rule "
        f"threshold, no stated error rate); use at least {need} held-out normal scans (anomaly3d fit "
        "--calibration DIR, or detector.calibrate(scans)) or a larger alpha"
    )


#: Inside :func:`last_calibration_warns`: the warning (or ``None``) of each calibration so far.
_HELD: ContextVar[list[str | None] | None] = ContextVar("anomaly3d_held_calibration_warnings", default=None)


def warn_calibration(n: int, alpha: float) -> None:
    """Log :func:`calibration_warning` of a calibration on ``n`` scans, or hold it inside
    :func:`last_calibration_warns` (where a later calibration replaces it)."""
    warning = calibration_warning(n, alpha)
    held = _HELD.get()
    if held is not None:
        held.append(warning)
    elif warning:
        log.warning(warning)


@contextlib.contextmanager
def last_calibration_warns() -> Iterator[None]:
    """Within the block (a fit that calibrates on its validation split, then on ``--calibration``, or
    a cross-fit, or an ensemble's members), only the last calibration's warning is logged, once, at
    the end: the calibration set actually used. Nested blocks defer to the outermost."""
    if _HELD.get() is not None:
        yield
        return
    token = _HELD.set([])
    try:
        yield
        held = _HELD.get() or [None]
    finally:
        _HELD.reset(token)
    if held[-1]:
        log.warning(held[-1])


def conformal_p(statistic: float, null: np.ndarray) -> float:
    """``(1 + #{null >= statistic}) / (n + 1)``; a non-finite statistic or null is an error."""
    require_finite(statistic, "scan statistic")
    null = np.asarray(null, dtype=np.float64)
    require_finite(null, "calibration statistics")
    return float((1 + np.count_nonzero(null >= statistic)) / (null.size + 1))


def bh_mask(p_values: np.ndarray, within: np.ndarray, q: float) -> np.ndarray:
    """Benjamini–Hochberg step-up at level ``q`` over the voxels ``within``: the rejected voxels."""
    p = np.asarray(p_values, dtype=np.float64)[within]
    out = np.zeros(np.shape(p_values), bool)
    m = p.size
    if m == 0:
        return out
    order = np.sort(p)
    below = np.nonzero(order <= q * np.arange(1, m + 1) / m)[0]
    if below.size:
        out[within] = p <= order[below[-1]]
    return out


@dataclass
class Clusters:
    """Clusters of one scan on its working grid: labels (0 = none), masses and cluster p-values."""

    labels: np.ndarray
    mass: np.ndarray  # per cluster (label i at index i - 1), mm³ x score excess
    p_value: np.ndarray  # conformal, against the calibration normals' largest cluster masses

    @property
    def max_mass(self) -> float:
        return float(self.mass.max()) if self.mass.size else 0.0


class CalibrationNull:
    """The null distributions of one detector, fitted on calibration normals' final score maps."""

    def __init__(self, forming_p: float = 0.001, top_k_fraction: float = 0.01) -> None:
        self.forming_p = forming_p
        self.top_k_fraction = top_k_fraction

    # ------------------------------------------------------------------ voxel null
    def fit(
        self, maps: list[np.ndarray], foregrounds: list[np.ndarray], bands: list[np.ndarray], spacings: list
    ) -> CalibrationNull:
        """Depth-banded voxel null, then each calibration scan's largest cluster mass and top-k mean."""
        for m, fg in zip(maps, foregrounds, strict=True):
            require_finite(m[fg], "calibration score map")
        n_bands = int(
            max(int(b[fg].max()) if fg.any() else 0 for b, fg in zip(bands, foregrounds, strict=True))
        )
        values = [
            np.concatenate([m[fg & (b == i)] for m, fg, b in zip(maps, foregrounds, bands, strict=True)])
            for i in range(n_bands + 1)
        ]
        self.count_ = np.array([v.size for v in values], np.int64)
        self.tail_ = [np.sort(v)[-TAIL:].astype(np.float32) for v in values]  # ascending
        self.body_ = np.stack(
            [
                np.quantile(v, BODY_LEVELS).astype(np.float32)
                if v.size
                else np.zeros(BODY_LEVELS.size, np.float32)
                for v in values
            ]
        )
        self._fill_empty_bands()
        self.n_scans_ = len(maps)
        self.forming_score_ = np.array([self._score_at(b, self.forming_p) for b in range(len(self.count_))])
        masses, tops = [], []
        for m, fg, b, sp in zip(maps, foregrounds, bands, spacings, strict=True):
            p = self.voxel_p(m, fg, b)
            masses.append(self.cluster_masses(m, p, fg, b, sp)[1].max(initial=0.0))
            tops.append(top_k_mean(m, fg, self.top_k_fraction))
        self.null_stats_ = {"max_cluster_mass": np.array(masses), "top_k_mean": np.array(tops)}
        return self

    def _fill_empty_bands(self) -> None:
        """A band no calibration voxel reached borrows the nearest band above it that has voxels."""
        for i in range(len(self.count_)):
            if self.count_[i] == 0:
                donor = max((j for j in range(i) if self.count_[j]), default=None)
                if donor is None:
                    donor = min(j for j in range(len(self.count_)) if self.count_[j])
                self.count_[i], self.tail_[i], self.body_[i] = (
                    self.count_[donor],
                    self.tail_[donor],
                    self.body_[donor],
                )

    def _score_at(self, band: int, p: float) -> float:
        """The score above which a voxel of ``band`` has a p-value of at most ``p`` (cluster-forming score)."""
        n, tail = int(self.count_[band]), self.tail_[band]
        allowed = int(math.floor(p * (n + 1))) - 1  # calibration values >= s allowed for p <= target
        if allowed < 0:
            return float("inf")
        if allowed < tail.size:
            return float(tail[tail.size - 1 - allowed])
        return float(np.interp(1.0 - allowed / n, BODY_LEVELS, self.body_[band]))

    def voxel_p(self, scores: np.ndarray, foreground: np.ndarray, bands: np.ndarray) -> np.ndarray:
        """Each foreground voxel's conformal p-value against its depth band's calibration voxels (1 outside)."""
        out = np.ones(scores.shape, np.float32)
        top = len(self.count_) - 1
        for band in np.unique(bands[foreground]):
            where = foreground & (bands == band)
            b = min(int(band), top)
            s = scores[where].astype(np.float64)
            n, tail = int(self.count_[b]), self.tail_[b].astype(np.float64)
            exact = tail.size - np.searchsorted(tail, s, side="left")  # tail values >= s
            body = n * (1.0 - np.interp(s, self.body_[b].astype(np.float64), BODY_LEVELS))
            ge = np.where(s >= tail[0], exact, np.maximum(body, tail.size))
            out[where] = (1.0 + ge) / (n + 1.0)
        return out

    # ------------------------------------------------------------------ clusters
    def cluster_masses(
        self, scores: np.ndarray, p: np.ndarray, foreground: np.ndarray, bands: np.ndarray, spacing: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels of the clusters of voxels with ``p <= forming_p`` and each cluster's mass."""
        forming = foreground & (p <= self.forming_p)
        labels, n = ndimage.label(forming, _STRUCTURE)
        if n == 0:
            return labels, np.zeros(0)
        top = len(self.forming_score_) - 1
        baseline = self.forming_score_[np.minimum(bands, top)]
        excess = np.where(forming, np.maximum(scores - baseline, 0.0), 0.0) + forming * 1e-3
        voxel_mm3 = float(np.prod(spacing))
        mass = ndimage.sum_labels(excess, labels, np.arange(1, n + 1)) * voxel_mm3
        return labels, np.asarray(mass, np.float64)

    def clusters(
        self, scores: np.ndarray, p: np.ndarray, foreground: np.ndarray, bands: np.ndarray, spacing: Any
    ) -> Clusters:
        """Clusters with their conformal p-values against the calibration normals' largest masses."""
        labels, mass = self.cluster_masses(scores, p, foreground, bands, spacing)
        null = self.null_stats_["max_cluster_mass"]
        pvals = np.array([(1 + np.count_nonzero(null >= m)) / (null.size + 1) for m in mass])
        return Clusters(labels, mass, pvals)

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``calibration.npz`` (loaded with ``allow_pickle=False``)."""
        out = {
            "count": self.count_,
            "body": self.body_,
            "forming_score": self.forming_score_,
            "settings": np.array([self.forming_p, self.top_k_fraction, self.n_scans_]),
        }
        out |= {f"tail_{i}": t for i, t in enumerate(self.tail_)}
        out |= {f"null_{k}": v for k, v in self.null_stats_.items()}
        return out

    @classmethod
    def from_arrays(cls, z: Any) -> CalibrationNull:
        forming_p, top_k, n_scans = (float(v) for v in z["settings"])
        null = cls(forming_p, top_k)
        null.count_, null.body_, null.forming_score_ = z["count"], z["body"], z["forming_score"]
        null.tail_ = [z[f"tail_{i}"] for i in range(len(null.count_))]
        null.null_stats_ = {k: z[f"null_{k}"] for k in SCAN_STATISTICS}
        null.n_scans_ = int(n_scans)
        return null


def top_k_mean(scores: np.ndarray, foreground: np.ndarray, fraction: float) -> float:
    """Mean of the top ``fraction`` of the foreground voxels' scores (the classic volume score)."""
    values = scores[foreground]
    if values.size == 0:
        return 0.0
    k = max(1, int(round(values.size * fraction)))
    return float(np.partition(values, values.size - k)[-k:].mean())
