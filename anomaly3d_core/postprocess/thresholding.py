"""Decision rules on score maps: thresholds, post-processing and the volume-level score."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from anomaly3d_core.config import PostprocessConfig, ThresholdConfig
from anomaly3d_core.interfaces import ThresholdMethod


def make_threshold(method: str, args: dict[str, Any] | None = None, registry: Any = None) -> ThresholdMethod:
    """Instantiate a registered threshold method by name."""
    if registry is None:
        from anomaly3d_core.registry import get_registry

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


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


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
        out = ndimage.binary_opening(out, structure=_ball(config.opening))
    if config.closing:
        out = ndimage.binary_closing(out, structure=_ball(config.closing))
    if (config.min_component_mm3 > 0 or config.keep_largest) and out.any():
        labels, n = ndimage.label(out, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(labels.ravel())[1:] * float(np.prod(spacing))
        keep = sizes >= config.min_component_mm3
        if config.keep_largest and keep.any():
            keep = np.zeros_like(keep)
            keep[int(np.argmax(sizes))] = True
        out = np.concatenate([[False], keep])[labels]
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
