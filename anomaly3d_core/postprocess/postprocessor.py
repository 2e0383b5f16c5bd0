"""The post-processor: everything between the network's raw residuals and a decision.

Like anomalib's ``PostProcessor``, it owns the fitted statistics that turn raw scores into
comparable ones (smoothing, normative per-voxel statistics), the calibrated voxel and volume
thresholds, and the mask clean-up. It is saved and loaded on its own, so it can be refitted or
replaced without touching the network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import median_abs_deviation

from anomaly3d_core.config import ThresholdConfig
from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError
from anomaly3d_core.io import arrays
from anomaly3d_core.postprocess import thresholding
from anomaly3d_core.postprocess.calibration import (
    SCAN_STATISTICS,
    CalibrationNull,
    conformal_p,
    min_calibration_scans,
    require_finite,
    warn_calibration,
)
from anomaly3d_core.postprocess.verdict import (
    CALIBRATED_RULE,
    UNCALIBRATED_RULE,
    Verdict,
    calibrated_verdict,
    conformal_threshold,
)

STATE_FILE, NORMATIVE_FILE, CALIBRATION_FILE = "state.json", "normative.npz", "calibration.npz"
log = logging.getLogger(__name__)


def robust_standardize(scores: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """``(s - median) / (1.4826 MAD)`` with both statistics taken over ``foreground``.

    A lesion is a small part of the foreground, so median and MAD describe the scan's normal
    tissue; what is left is how far each voxel stands out within its own scan.
    """
    values = scores[foreground] if foreground.any() else scores.ravel()
    median = float(np.median(values))
    scale = float(median_abs_deviation(values, scale="normal"))
    if not np.isfinite(scale) or scale <= 1e-12:
        scale = float(values.std()) or 1.0
    return ((scores - median) / scale).astype(np.float32)


#: Lower edges (mm) of the depth bands: distance of a voxel from the nearest voxel outside the foreground.
DEPTH_EDGES_MM = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0)


def depth_band(foreground: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Each voxel's depth band (index into :data:`DEPTH_EDGES_MM`); the array's border counts as outside."""
    padded = np.pad(foreground, 1)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return np.searchsorted(np.asarray(DEPTH_EDGES_MM), depth, side="right") - 1


class PostProcessor:
    """Smoothing, normative statistics, calibration and decisions for one detector's scores."""

    def __init__(self, config: ThresholdConfig, registry: Any = None) -> None:
        self.config = config
        self.registry = registry
        self.normative_: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ transforms
    def scan_scores(self, raw: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """The network's raw scores of one scan, smoothed and (optionally) put on the scan's own robust scale."""
        sigma = self.config.smoothing_sigma
        scores = ndimage.gaussian_filter(raw, sigma) if sigma > 0 else raw
        if self.config.scan_normalization == "robust":
            scores = robust_standardize(scores, foreground)
        return scores

    def check_shared_grid(self, shapes: list[tuple[int, ...]]) -> None:
        """Normative statistics compare voxels at the same place: every scan must share one grid."""
        distinct = sorted(set(shapes))
        if self.config.normative and len(distinct) > 1:
            raise ConfigError(
                f"threshold.normative needs every scan on one grid after preprocessing, got {len(distinct)} "
                f"shapes ({', '.join(str(s) for s in distinct)}); use template-space or registered scans "
                "(data.preprocessing.register_to) with crop_foreground: false"
            )

    def fit_normative(self, scan_maps: list[np.ndarray]) -> PostProcessor:
        """Per-voxel mean and std of the training normals' :meth:`scan_scores`, smoothed (2 voxels) to steady them."""
        maps = np.stack(scan_maps)
        mean = ndimage.gaussian_filter(maps.mean(0), 2.0)
        std = ndimage.gaussian_filter(maps.std(0), 2.0) + 0.05 * float(maps.mean())
        self.normative_ = {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
        return self

    def fit_depth(
        self, scan_maps: list[np.ndarray], foregrounds: list[np.ndarray], spacings: list
    ) -> PostProcessor:
        """Median and robust spread of the training normals' :meth:`scan_scores` in each depth band."""
        scores = np.concatenate([m[fg] for m, fg in zip(scan_maps, foregrounds, strict=True)])
        bands = np.concatenate([depth_band(fg, sp)[fg] for fg, sp in zip(foregrounds, spacings, strict=True)])
        median, scale = np.zeros(len(DEPTH_EDGES_MM)), np.ones(len(DEPTH_EDGES_MM))
        for band in range(len(DEPTH_EDGES_MM)):
            values = scores[bands == band]
            if values.size >= 50:
                median[band] = np.median(values)
                scale[band] = max(float(median_abs_deviation(values, scale="normal")), 1e-6)
            elif band:  # too few voxels this deep: reuse the band above
                median[band], scale[band] = median[band - 1], scale[band - 1]
        self.depth_ = {"median": median.tolist(), "scale": scale.tolist()}
        return self

    def transform(
        self,
        scan_scores: np.ndarray,
        foreground: np.ndarray,
        source: str | None = None,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> np.ndarray:
        """:meth:`scan_scores` -> final scores on the same grid (zero outside ``foreground``)."""
        scores = scan_scores
        depth = getattr(self, "depth_", None)
        if depth is not None:
            band = depth_band(foreground, spacing)
            scores = (scores - np.asarray(depth["median"])[band]) / np.asarray(depth["scale"])[band]
        if self.normative_ is not None:
            if scores.shape != self.normative_["mean"].shape:
                raise DataError(
                    source,
                    f"preprocessed grid {scores.shape} differs from the normative grid "
                    f"{self.normative_['mean'].shape}; normative scoring needs every scan on one grid",
                )
            scores = np.maximum((scores - self.normative_["mean"]) / self.normative_["std"], 0.0)
        else:
            scores = scores.astype(np.float32, copy=True)
        scores[~foreground] = 0.0
        return scores

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self, maps: list[np.ndarray], foregrounds: list[np.ndarray], spacings: list | None = None
    ) -> PostProcessor:
        """Voxel and volume thresholds, score statistics and the calibration nulls (p-values, clusters)
        from final score maps of normal scans that the model never trained on."""
        state = thresholding.calibrate(maps, foregrounds, self.config, self.registry)
        self.threshold_: float = state["threshold"]
        self.volume_threshold_: float = state["volume_threshold"]
        self.score_stats_: dict[str, float] = state["score_stats"]
        self.normal_volume_scores_: list[float] = state["normal_volume_scores"]
        spacings = spacings or [(1.0, 1.0, 1.0)] * len(maps)
        self.null_ = fit_null(maps, foregrounds, spacings, self.config)
        return self

    @property
    def scan_threshold(self) -> float:
        """The volume score above which a scan is flagged: conformal at ``alpha``, or the legacy threshold."""
        if not self.decisions_calibrated:
            return self.volume_threshold_
        return conformal_threshold(self.null_.null_stats_[self.config.scan_statistic], self.config.alpha)

    @property
    def decisions_calibrated(self) -> bool:
        """Whether scans are decided by their conformal p-value: calibration nulls of enough normals for ``alpha``."""
        return getattr(self, "null_", None) is not None and self.n_calibration >= min_calibration_scans(
            self.config.alpha
        )

    @property
    def decision_rule(self) -> str:
        """The rule that decides ``is_anomalous`` (:data:`.verdict.CALIBRATED_RULE` or ``UNCALIBRATED_RULE``)."""
        return CALIBRATED_RULE if self.decisions_calibrated else UNCALIBRATED_RULE

    @property
    def mask_rule(self) -> str:
        """The mask rule in force: ``threshold.mask_rule``, except that uncalibrated decisions replace the
        cluster mask (its p-values cannot reach ``alpha`` either) and, without nulls, any rule by ``threshold``."""
        if self.decisions_calibrated:
            return self.config.mask_rule
        if getattr(self, "null_", None) is None or self.config.mask_rule == "cluster":
            return "threshold"
        return self.config.mask_rule  # BH needs only the pooled voxel null

    @property
    def scan_statistic(self) -> str:
        """What ``volume_score`` is: ``threshold.scan_statistic``, or ``top_k_mean`` for uncalibrated decisions."""
        return self.config.scan_statistic if self.decisions_calibrated else "top_k_mean"

    def rule_summary(self) -> str:
        """One line saying how many normals calibrated the model and the scan and mask rules in force."""
        alpha, n = self.config.alpha, self.n_calibration
        rule = f"{self.scan_statistic} > {self.scan_threshold:.4g}"
        if self.decisions_calibrated:
            return (
                f"calibrated on {n} normal scan(s): a scan is flagged when its p-value <= alpha {alpha:g} "
                f"({rule}); mask: {self.mask_rule}"
            )
        return (
            f"calibrated on {n} normal scan(s), too few for alpha {alpha:g} (at least "
            f"{min_calibration_scans(alpha)} needed): a scan is flagged when {rule} (uncalibrated volume "
            f"threshold, no stated error rate); mask: {self.mask_rule}"
        )

    @property
    def n_calibration(self) -> int:
        """How many normal scans calibrated the p-values (0 for a model saved before calibration nulls)."""
        null: CalibrationNull | None = getattr(self, "null_", None)
        return 0 if null is None else null.n_scans_

    @property
    def calibrated(self) -> bool:
        return hasattr(self, "threshold_")

    def normalized(self, scores: np.ndarray) -> np.ndarray:
        """Scores as z-values against the normal-validation statistics (how ensembles compare members)."""
        return (scores - self.score_stats_["mean"]) / self.score_stats_["std"]

    def decide(
        self, scores: np.ndarray, foreground: np.ndarray, spacing: tuple[float, float, float]
    ) -> tuple[float, np.ndarray, float, bool]:
        """Threshold used, post-processed mask, volume score and the decision of the legacy rule (a voxel
        threshold and a volume threshold without stated error rates); :meth:`verdict` is the calibrated one."""
        if not self.calibrated:
            raise Anomaly3DError(
                "the detector is not calibrated; fit it or call calibrate(normal_scans) first"
            )
        threshold, mask, vscore = thresholding.decide(
            scores, foreground, spacing, self.config, self.threshold_, self.registry
        )
        return threshold, mask, vscore, bool(vscore > self.volume_threshold_)

    def verdict(
        self,
        scores: np.ndarray,
        foreground: np.ndarray,
        spacing: tuple[float, float, float],
        source: str | None = None,
    ) -> Verdict:
        """The calibrated decision of one scan's final scores on the working grid (see :class:`Verdict`)."""
        require_finite_scores(scores, foreground, source)
        threshold, legacy_mask, top_k, legacy_anomalous = self.decide(scores, foreground, spacing)
        null: CalibrationNull | None = getattr(self, "null_", None)
        if null is None:  # a model saved before calibration nulls: the legacy rule, no p-values
            return Verdict(
                threshold, legacy_mask, top_k, self.volume_threshold_, legacy_anomalous, "top_k_mean"
            )
        bands = depth_band(foreground, spacing)
        if self.decisions_calibrated:
            return calibrated_verdict(
                null, self.config, scores, foreground, bands, spacing, threshold, legacy_mask
            )
        # too few calibration normals for alpha (fit warned): p-values are reported, but the scan
        # decision is the uncalibrated threshold's, and the mask :attr:`mask_rule`'s
        v = calibrated_verdict(
            null,
            self.config.model_copy(update={"mask_rule": self.mask_rule}),
            scores,
            foreground,
            bands,
            spacing,
            threshold,
            legacy_mask,
        )
        v.volume_score, v.volume_threshold, v.scan_statistic = top_k, self.volume_threshold_, "top_k_mean"
        v.p_value = conformal_p(top_k, null.null_stats_["top_k_mean"])
        v.is_anomalous, v.decision_rule = legacy_anomalous, UNCALIBRATED_RULE
        return v

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "depth": getattr(self, "depth_", None),
            "threshold": self.threshold_,
            "volume_threshold": self.volume_threshold_,
            "score_stats": self.score_stats_,
            "normal_volume_scores": self.normal_volume_scores_,
            "n_calibration": self.n_calibration,  # for the reader: the nulls are in calibration.npz
        }

    def load_state_dict(self, state: dict[str, Any]) -> PostProcessor:
        self.threshold_, self.volume_threshold_ = state["threshold"], state["volume_threshold"]
        self.score_stats_, self.normal_volume_scores_ = state["score_stats"], state["normal_volume_scores"]
        if state.get("depth") is not None:
            self.depth_ = state["depth"]
        return self

    def save(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        """``state.json`` (thresholds, statistics and ``extra``) and ``normative.npz`` when fitted."""
        (folder / STATE_FILE).write_text(json.dumps({**self.state_dict(), **(extra or {})}, indent=2))
        if self.normative_ is not None:
            np.savez_compressed(folder / NORMATIVE_FILE, **self.normative_)
        if getattr(self, "null_", None) is not None:
            np.savez_compressed(folder / CALIBRATION_FILE, **self.null_.to_arrays())

    @classmethod
    def load(cls, folder: Path, config: ThresholdConfig, registry: Any = None) -> tuple[PostProcessor, dict]:
        """The post-processor saved in ``folder`` and the whole ``state.json`` (for the caller's extras)."""
        state = json.loads(arrays.read_text(folder / STATE_FILE))
        post = cls(config, registry).load_state_dict(state)
        if (folder / NORMATIVE_FILE).is_file():  # each array's size checked before it is inflated
            post.normative_ = arrays.load_npz(folder / NORMATIVE_FILE, ("mean", "std"))
        if (folder / CALIBRATION_FILE).is_file():
            post.null_ = load_null(folder / CALIBRATION_FILE)
        else:
            log.warning(
                "%s: saved before calibration nulls (no %s): scans get the legacy decision (volume score "
                "above volume_threshold) with no p-value; refit, or calibrate on held-out normals, for p-values",
                folder,
                CALIBRATION_FILE,
            )
        return post, state


def require_finite_scores(scores: np.ndarray, foreground: np.ndarray, source: str | None = None) -> None:
    """A NaN or infinite score inside the foreground is a failed scan, never a decision."""
    try:
        require_finite(scores[foreground], "voxel scores")
    except ValueError as exc:
        raise DataError(source, str(exc)) from None


def fit_null(
    maps: list[np.ndarray], foregrounds: list[np.ndarray], spacings: list, config: ThresholdConfig
) -> CalibrationNull:
    """The calibration nulls of :mod:`.calibration`, with a warning when too few scans for ``alpha``."""
    for m, fg in zip(maps, foregrounds, strict=True):
        require_finite_scores(m, fg, "calibration scan")
    bands = [depth_band(fg, sp) for fg, sp in zip(foregrounds, spacings, strict=True)]
    null = CalibrationNull(config.cluster_forming_p, config.volume.top_k_fraction)
    null.fit(maps, foregrounds, bands, spacings)
    warn_calibration(len(maps), config.alpha)
    return null


def load_null(path: Path) -> CalibrationNull:
    """``calibration.npz``, each array's size checked before it is inflated."""
    base = arrays.load_npz(
        path, ("count", "body", "forming_score", "settings", *(f"null_{k}" for k in SCAN_STATISTICS))
    )
    tails = arrays.load_npz(path, tuple(f"tail_{i}" for i in range(len(base["count"]))))
    return CalibrationNull.from_arrays(base | tails)
