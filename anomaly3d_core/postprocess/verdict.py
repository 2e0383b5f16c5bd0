"""One scan's calibrated verdict: p-values, the decision mask under its stated error rate, the scan decision."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomaly3d_core.config import ThresholdConfig
from anomaly3d_core.postprocess.calibration import CalibrationNull, Clusters, bh_mask, conformal_p, top_k_mean

#: The two rules that decide ``is_anomalous``, as every result row names them (``decision_rule``).
CALIBRATED_RULE = "p_value <= alpha"
UNCALIBRATED_RULE = "volume_score > volume_threshold (uncalibrated)"


@dataclass
class Verdict:
    """Everything decided about one scan on the working grid.

    ``volume_score`` is the scan statistic named by ``scan_statistic``; ``decision_rule`` says what
    decided ``is_anomalous``: :data:`CALIBRATED_RULE` (``p_value <= alpha``, the same as ``volume_score >
    volume_threshold``) or, for a model saved before calibration nulls (``p_value`` NaN) or calibrated on
    too few normals for ``alpha``, :data:`UNCALIBRATED_RULE`. ``voxel_threshold`` is the calibrated
    score threshold of the ``threshold`` mask rule, whatever rule made ``mask``.
    """

    voxel_threshold: float
    mask: np.ndarray
    volume_score: float
    volume_threshold: float
    is_anomalous: bool
    scan_statistic: str
    p_value: float = math.nan
    alpha: float = math.nan
    mask_rule: str = "threshold"
    n_calibration: int = 0
    p_map: np.ndarray | None = None
    labels: np.ndarray | None = None  # the mask's clusters (0 = none), numbered from 1
    cluster_p: np.ndarray | None = None  # per label (index label - 1); NaN unless mask_rule is cluster
    decision_rule: str = UNCALIBRATED_RULE

    @property
    def error_rate(self) -> str:
        """The promise the mask keeps, in words."""
        if self.mask_rule == "cluster":
            return f"family-wise error of any false cluster in a normal scan <= {self.alpha:g}"
        if self.mask_rule == "fdr":
            return "expected fraction of false voxels among the flagged <= q (Benjamini-Hochberg)"
        return "none stated (calibrated percentile threshold)"


def conformal_threshold(null: np.ndarray, alpha: float) -> float:
    """The statistic above which the conformal p-value is <= ``alpha`` (``inf``: too few scans to reach it)."""
    allowed = int(math.floor(alpha * (null.size + 1) + 1e-9)) - 1  # calibration values >= s allowed
    if allowed < 0:
        return math.inf
    ordered = np.sort(np.asarray(null, np.float64))[::-1]
    return float(ordered[allowed]) if allowed < ordered.size else -math.inf


def calibrated_verdict(
    null: CalibrationNull,
    config: ThresholdConfig,
    scores: np.ndarray,
    foreground: np.ndarray,
    bands: np.ndarray,
    spacing: tuple[float, float, float],
    voxel_threshold: float,
    threshold_mask: np.ndarray,
) -> Verdict:
    """p-map, clusters, the configured mask rule and the scan's conformal p-value."""
    p_map = null.voxel_p(scores, foreground, bands)
    clusters: Clusters = null.clusters(scores, p_map, foreground, bands, spacing)
    if config.scan_statistic == "max_cluster_mass":
        statistic = clusters.max_mass
    else:
        statistic = top_k_mean(scores, foreground, null.top_k_fraction)
    calibration = null.null_stats_[config.scan_statistic]
    p_value = conformal_p(statistic, calibration)
    if config.mask_rule == "cluster":
        keep = np.nonzero(clusters.p_value <= config.alpha)[0]
        labels = np.zeros_like(clusters.labels)
        for new, old in enumerate(keep, start=1):
            labels[clusters.labels == old + 1] = new
        cluster_p = clusters.p_value[keep]
    else:
        mask = bh_mask(p_map, foreground, config.fdr_q) if config.mask_rule == "fdr" else threshold_mask
        labels, n = ndimage.label(mask, np.ones((3, 3, 3), bool))
        cluster_p = np.full(n, math.nan)
    return Verdict(
        voxel_threshold,
        labels > 0,
        statistic,
        conformal_threshold(calibration, config.alpha),
        bool(p_value <= config.alpha),
        config.scan_statistic,
        p_value,
        config.alpha,
        config.mask_rule,
        null.n_scans_,
        p_map,
        labels,
        cluster_p,
        CALIBRATED_RULE,
    )
