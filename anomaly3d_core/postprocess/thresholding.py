"""Decision rules on score maps: thresholds, post-processing and the volume-level score."""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage import measure, morphology

from anomaly3d_core.config import PostprocessConfig, ThresholdConfig
from anomaly3d_core.interfaces import ThresholdMethod
from anomaly3d_core.registry import get_registry


def make_threshold(method: str, args: dict[str, Any] | None = None, registry: Any = None) -> ThresholdMethod:
    """Instantiate a registered threshold method by name."""
    if registry is None:
        registry = get_registry()
    return registry.get("thresholds", method)(**(args or {}))


def compute_threshold_from_normal_scores(
    scores: np.ndarray,
    method: str = "percentile",
    percentile: float = 95.0,
    sigma_multiplier: float = 3.0,
    **kwargs: Any,
) -> float:
    """Seed API: threshold from scores of normal data with a registered method."""
    args: dict[str, Any] = dict(kwargs)
    if method == "percentile":
        args.setdefault("percentile", percentile)
    elif method in ("sigma", "mad"):
        args.setdefault("k", sigma_multiplier)
    return make_threshold(method, args).fit(np.asarray(scores)).threshold_


def apply_threshold(score_map: np.ndarray, threshold: float) -> np.ndarray:
    """Binary mask: ``score > threshold``."""
    return np.asarray(score_map) > threshold


def postprocess_mask(
    mask: np.ndarray,
    config: PostprocessConfig,
    foreground: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Foreground restriction, opening/closing, removal of components under ``min_component_mm3``."""
    out = np.asarray(mask, dtype=bool)
    if config.restrict_to_foreground and foreground is not None:
        out = out & foreground
    if config.opening:
        out = morphology.binary_opening(out, morphology.ball(config.opening))
    if config.closing:
        out = morphology.binary_closing(out, morphology.ball(config.closing))
    if config.min_component_mm3 > 0 and out.any():
        # components of at least min_component_mm3 stay: remove those of at most (that many voxels - 1)
        min_voxels = int(np.ceil(config.min_component_mm3 / float(np.prod(spacing)) - 1e-9))
        out = morphology.remove_small_objects(out, max_size=max(0, min_voxels - 1), connectivity=3)
    if config.keep_largest and out.any():
        labels = measure.label(out, connectivity=3)
        out = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return out


def volume_score(
    score_map: np.ndarray, foreground: np.ndarray | None = None, top_k_fraction: float = 0.01
) -> float:
    """Mean of the top ``top_k_fraction`` of voxel scores (inside the foreground when given)."""
    values = np.asarray(score_map)[foreground] if foreground is not None else np.asarray(score_map).ravel()
    if values.size == 0:
        return 0.0
    k = max(1, int(round(values.size * top_k_fraction)))
    return float(np.partition(values, values.size - k)[-k:].mean())


def multi_threshold_analysis(
    score_map: np.ndarray,
    threshold_range: tuple[float, float] | None = None,
    num_thresholds: int = 50,
    ground_truth: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Fraction flagged (and Dice/precision/recall with ``ground_truth``) over a range of thresholds."""
    scores = np.asarray(score_map, dtype=np.float64).ravel()
    lo, hi = threshold_range if threshold_range is not None else (float(scores.min()), float(scores.max()))
    thresholds = np.linspace(lo, hi, num_thresholds)
    result: dict[str, np.ndarray] = {
        "thresholds": thresholds,
        "fraction_flagged": np.array([(scores > t).mean() for t in thresholds]),
    }
    if ground_truth is not None:
        gt = np.asarray(ground_truth).ravel() > 0
        dice, prec, rec = [], [], []
        for t in thresholds:
            pred = scores > t
            tp = float((pred & gt).sum())
            dice.append(2 * tp / max(pred.sum() + gt.sum(), 1))
            prec.append(tp / max(pred.sum(), 1))
            rec.append(tp / max(gt.sum(), 1))
        result.update(dice=np.array(dice), precision=np.array(prec), recall=np.array(rec))
    return result


def calibrate(
    maps: list[np.ndarray], foregrounds: list[np.ndarray], cfg: ThresholdConfig, registry: Any = None
) -> dict[str, Any]:
    """Voxel threshold, volume threshold and score statistics from score maps of normal scans."""
    voxels = np.concatenate([m[fg] for m, fg in zip(maps, foregrounds, strict=True)]).astype(np.float64)
    normal_volume_scores = [
        volume_score(m, fg, cfg.volume.top_k_fraction) for m, fg in zip(maps, foregrounds, strict=True)
    ]
    vol_method = make_threshold(cfg.volume.method.type, cfg.volume.method.args, registry)
    return {
        "threshold": float(make_threshold(cfg.type, cfg.args, registry).fit(voxels).threshold_),
        "volume_threshold": float(vol_method.fit(np.array(normal_volume_scores)).threshold_),
        "score_stats": {"mean": float(voxels.mean()), "std": float(voxels.std() or 1.0)},
        "normal_volume_scores": normal_volume_scores,
    }


def decide(
    scores: np.ndarray,
    foreground: np.ndarray,
    spacing: tuple[float, float, float],
    cfg: ThresholdConfig,
    calibrated: float,
    registry: Any = None,
) -> tuple[float, np.ndarray, float]:
    """The threshold used (calibrated, or per map for adaptive methods), the post-processed mask and the volume score."""
    threshold = calibrated
    method = make_threshold(cfg.type, cfg.args, registry)
    if method.calibration == "adaptive":
        threshold = float(method.fit(scores[foreground]).threshold_)
    mask = postprocess_mask(scores > threshold, cfg.postprocess, foreground, spacing)
    return threshold, mask, volume_score(scores, foreground, cfg.volume.top_k_fraction)
