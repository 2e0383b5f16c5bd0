"""Voxel-, lesion- and volume-level metrics for 3D score maps.

Pooled voxel metrics follow the MOOD challenge: all voxels of all volumes in one ranking.
Up to ``max_exact_voxels`` they are exact (scikit-learn); beyond, and always for bootstrap
intervals, they come from per-volume histograms on shared quantile bins, so memory stays at
``n_volumes x n_bins`` counts. The histogram AUROC is off by at most half the share of
(positive, negative) pairs that fall in the same bin; that bound is reported as
``pixel_auc_hist_error_bound``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from anomaly3d_core.errors import did_you_mean

N_BINS = 4096


def _flat(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None) -> list[np.ndarray]:
    if masks is None:
        return [np.asarray(a).ravel() for a in arrays]
    return [
        np.asarray(a)[m] if m is not None else np.asarray(a).ravel()
        for a, m in zip(arrays, masks, strict=True)
    ]


def quantile_edges(
    scores: Sequence[np.ndarray], n_bins: int = N_BINS, sample: int = 400_000, seed: int = 0
) -> np.ndarray:
    """Bin edges at quantiles of a random sample of the pooled scores (fine where the data is dense)."""
    rng = np.random.default_rng(seed)
    total = sum(s.size for s in scores)
    parts = [s[rng.integers(0, s.size, max(1, int(sample * s.size / total)))] for s in scores if s.size]
    edges = np.unique(np.quantile(np.concatenate(parts).astype(np.float64), np.linspace(0, 1, n_bins + 1)))
    lo, hi = min(float(s.min()) for s in scores if s.size), max(float(s.max()) for s in scores if s.size)
    return np.unique(np.concatenate([[lo], edges, [hi]]))


def volume_histograms(
    gts: Sequence[np.ndarray], scores: Sequence[np.ndarray], edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-volume counts of positive and negative voxels per bin, ``(n_volumes, n_bins)`` each."""
    n = len(edges) - 1
    pos, neg = np.zeros((len(gts), n), np.int64), np.zeros((len(gts), n), np.int64)
    for i, (g, s) in enumerate(zip(gts, scores, strict=True)):
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n - 1)
        pos[i] = np.bincount(idx[g], minlength=n)
        neg[i] = np.bincount(idx[~g], minlength=n)
    return pos, neg


def hist_metrics(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """AUROC, AP and best Dice from pooled histograms (bins ascending in score)."""
    P, N = float(pos.sum()), float(neg.sum())
    if P == 0 or N == 0:
        return {"auc": float("nan"), "ap": float("nan"), "best_dice": float("nan"), "auc_error_bound": 0.0}
    neg_below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    auc = float((pos * (neg_below + 0.5 * neg)).sum() / (P * N))
    tp = np.cumsum(pos[::-1]).astype(np.float64)
    fp = np.cumsum(neg[::-1]).astype(np.float64)
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / P
    ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    dice = 2 * tp / (tp + fp + P)
    return {
        "auc": auc,
        "ap": ap,
        "best_dice": float(dice.max()),
        "auc_error_bound": float((pos * neg).sum() / (2 * P * N)),
    }


def dice_iou(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    tp = float(np.logical_and(gt, pred).sum())
    total = float(gt.sum() + pred.sum())
    union = total - tp
    return (2 * tp / total if total else 1.0), (tp / union if union else 1.0)


def lesion_detection(gt: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """Connected-component (26-neighbour) matching: a true lesion is found if any predicted voxel touches it."""
    structure = np.ones((3, 3, 3), bool)
    gt_lab, n_gt = ndimage.label(gt, structure)
    pr_lab, n_pr = ndimage.label(pred, structure)
    hit_gt = np.unique(gt_lab[pred & (gt_lab > 0)])
    hit_pr = np.unique(pr_lab[gt & (pr_lab > 0)])
    return {"tp": int(hit_gt.size), "fn": int(n_gt - hit_gt.size), "fp": int(n_pr - hit_pr.size)}


def bootstrap_ci(
    pos: np.ndarray, neg: np.ndarray, n_boot: int = 500, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """95 % intervals of pooled AUROC, AP and best Dice, resampling volumes with replacement."""
    rng = np.random.default_rng(seed)
    n = pos.shape[0]
    samples: dict[str, list[float]] = {"auc": [], "ap": [], "best_dice": []}
    for _ in range(n_boot):
        pick = rng.integers(0, n, n)
        m = hist_metrics(pos[pick].sum(0), neg[pick].sum(0))
        for key in samples:
            if np.isfinite(m[key]):
                samples[key].append(m[key])
    return {
        k: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2)))
        if v
        else (float("nan"),) * 2
        for k, v in samples.items()
    }


def comprehensive_evaluation(
    ground_truth_masks: Sequence[np.ndarray],
    score_maps: Sequence[np.ndarray],
    threshold: float,
    *,
    predicted_masks: Sequence[np.ndarray] | None = None,
    foreground_masks: Sequence[np.ndarray | None] | None = None,
    volume_scores: Sequence[float] | None = None,
    volume_labels: Sequence[int] | None = None,
    volume_threshold: float | None = None,
    n_bootstrap: int = 500,
    max_exact_voxels: int = 30_000_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric in one dict; keys include the seed's ``pixel_auc``, ``pixel_iou``, ``pixel_dice``.

    ``predicted_masks`` (post-processed) default to ``score > threshold``. ``foreground_masks``
    restrict voxel metrics (e.g. to the brain). Volume labels default to "has any lesion voxel".
    """
    if len(ground_truth_masks) != len(score_maps):
        raise ValueError(f"{len(ground_truth_masks)} ground-truth masks for {len(score_maps)} score maps")
    gts = _flat([np.asarray(g) > 0 for g in ground_truth_masks], foreground_masks)
    scores = _flat([np.asarray(s, dtype=np.float32) for s in score_maps], foreground_masks)
    preds_full = (
        predicted_masks if predicted_masks is not None else [np.asarray(s) > threshold for s in score_maps]
    )
    preds = _flat([np.asarray(p, bool) for p in preds_full], foreground_masks)
    total = sum(s.size for s in scores)
    y_all_pos = sum(int(g.sum()) for g in gts)
    out: dict[str, Any] = {
        "n_volumes": len(gts),
        "n_voxels": int(total),
        "n_positive_voxels": y_all_pos,
        "threshold": float(threshold),
    }
    edges = quantile_edges(scores, seed=seed)
    pos, neg = volume_histograms(gts, scores, edges)
    hist = hist_metrics(pos.sum(0), neg.sum(0))
    if 0 < y_all_pos < total:
        if total <= max_exact_voxels:
            y, s = np.concatenate(gts), np.concatenate(scores)
            out["pixel_auc"] = float(roc_auc_score(y, s))
            out["pixel_ap"] = float(average_precision_score(y, s))
            precision, recall, _ = precision_recall_curve(y, s)
            out["pixel_best_dice"] = float(
                np.nanmax(2 * precision * recall / np.maximum(precision + recall, 1e-12))
            )
            out["pooled_method"] = "exact"
        else:
            out.update(
                pixel_auc=hist["auc"],
                pixel_ap=hist["ap"],
                pixel_best_dice=hist["best_dice"],
                pooled_method=f"histogram ({len(edges) - 1} bins)",
            )
        out["pixel_auc_hist_error_bound"] = hist["auc_error_bound"]
        ci = bootstrap_ci(pos, neg, n_bootstrap, seed)
        out.update(pixel_auc_ci=ci["auc"], pixel_ap_ci=ci["ap"], pixel_best_dice_ci=ci["best_dice"])
    else:
        out.update(pixel_auc=float("nan"), pixel_ap=float("nan"), pixel_best_dice=float("nan"))
    tp = sum(float((g & p).sum()) for g, p in zip(gts, preds, strict=True))
    npred = sum(float(p.sum()) for p in preds)
    dice = 2 * tp / (npred + y_all_pos) if npred + y_all_pos else 1.0
    out["pixel_dice"] = float(dice)
    out["pixel_iou"] = float(tp / (npred + y_all_pos - tp)) if npred + y_all_pos - tp else 1.0
    per_auc, per_ap, per_dice = [], [], []
    lesions = {"tp": 0, "fn": 0, "fp": 0}
    for g, s, p, g_full, p_full in zip(gts, scores, preds, ground_truth_masks, preds_full, strict=True):
        if 0 < g.sum() < g.size:
            per_auc.append(roc_auc_score(g, s))
            per_ap.append(average_precision_score(g, s))
            per_dice.append(dice_iou(g, p)[0])
        for k, v in lesion_detection(np.asarray(g_full) > 0, np.asarray(p_full, bool)).items():
            lesions[k] += v
    out.update(
        per_volume_auc_mean=float(np.mean(per_auc)) if per_auc else float("nan"),
        per_volume_ap_mean=float(np.mean(per_ap)) if per_ap else float("nan"),
        per_volume_dice_mean=float(np.mean(per_dice)) if per_dice else float("nan"),
        lesion_tp=lesions["tp"],
        lesion_fn=lesions["fn"],
        lesion_fp=lesions["fp"],
        lesion_sensitivity=lesions["tp"] / max(lesions["tp"] + lesions["fn"], 1)
        if lesions["tp"] + lesions["fn"]
        else float("nan"),
        lesion_fp_per_volume=lesions["fp"] / max(len(gts), 1),
    )
    if volume_scores is not None:
        labels = np.asarray(volume_labels if volume_labels is not None else [int(g.any()) for g in gts])
        vs = np.asarray(volume_scores, dtype=np.float64)
        if 0 < labels.sum() < labels.size:
            out["volume_auroc"] = float(roc_auc_score(labels, vs))
            out["volume_ap"] = float(average_precision_score(labels, vs))
        if volume_threshold is not None:
            decided = vs > volume_threshold
            out["volume_threshold"] = float(volume_threshold)
            out["volume_accuracy"] = float((decided == labels.astype(bool)).mean())
            out["volume_f1"] = float(f1_score(labels, decided, zero_division=0))
    return out


def compute_optimal_threshold(
    ground_truth: np.ndarray | Sequence[np.ndarray],
    score_maps: np.ndarray | Sequence[np.ndarray],
    metric: str = "f1",
) -> tuple[float, float]:
    """Seed API: the threshold maximising ``f1``/``dice`` (identical at voxel level) or ``youden`` (TPR − FPR)."""
    gts = [ground_truth] if isinstance(ground_truth, np.ndarray) else list(ground_truth)
    maps = [score_maps] if isinstance(score_maps, np.ndarray) else list(score_maps)
    y = np.concatenate([np.asarray(g).ravel() > 0 for g in gts])
    s = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    if metric in ("f1", "dice"):
        precision, recall, thresholds = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        i = int(np.argmax(f1))
        # precision_recall_curve predicts score >= t; nudge below so "score > t" flags the same voxels
        return float(np.nextafter(thresholds[i], -np.inf)), float(f1[i])
    if metric == "youden":
        fpr, tpr, thresholds = roc_curve(y, s)
        i = int(np.argmax(tpr - fpr))
        return float(np.nextafter(thresholds[i], -np.inf)), float(tpr[i] - fpr[i])
    raise ValueError(did_you_mean(metric, ["dice", "f1", "youden"], "metric"))
