"""How well the stated error rates hold on labelled scans: the figures that back alpha and q.

- on normal scans (no lesion voxel): the fraction flagged (should be <= alpha) with its
  Clopper–Pearson 95 % interval, false-positive clusters per scan and the fraction of scans with any;
- on lesioned scans: the fraction flagged, the voxel false discovery proportion of the mask (mean
  over scans of false voxels / flagged voxels, 0 when nothing is flagged: what Benjamini–Hochberg
  bounds by q) and false-positive clusters (clusters touching no lesion) per scan;
- lesion-wise sensitivity by lesion size (< 0.5 cm³, 0.5–5, > 5 cm³; 26-neighbour components);
- the scan AUROC of the p-value (smaller is more anomalous) next to that of the top-k-mean score;
  NaN ("not calibrated") when a scan has no p-value (a model saved before calibration nulls).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

SIZE_BINS_CM3 = {"lt0.5": (0.0, 0.5), "0.5to5": (0.5, 5.0), "gt5": (5.0, float("inf"))}
_STRUCTURE = np.ones((3, 3, 3), bool)


def binomial_ci(k: int, n: int) -> tuple[float, float]:
    """Clopper–Pearson 95 % interval of a proportion ``k / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return (float(ci.low), float(ci.high))


def false_clusters(truth: np.ndarray, mask: np.ndarray) -> int:
    """Clusters of ``mask`` that touch no voxel of ``truth``."""
    labels, n = ndimage.label(mask, _STRUCTURE)
    return int(n - np.unique(labels[truth & (labels > 0)]).size)


def lesion_hits(truth: np.ndarray, mask: np.ndarray, voxel_mm3: float) -> list[tuple[float, bool]]:
    """``(volume in cm³, found)`` of each true lesion (found: any mask voxel inside it)."""
    labels, n = ndimage.label(truth, _STRUCTURE)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(np.ones(truth.shape), labels, np.arange(1, n + 1)) * voxel_mm3 / 1000.0
    hit = ndimage.maximum(mask.astype(np.uint8), labels, np.arange(1, n + 1))
    return [(float(s), bool(h)) for s, h in zip(sizes, np.atleast_1d(hit), strict=True)]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # scikit-learn: evaluation only

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < labels.size else float("nan")


def guarantee_metrics(
    truths: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    is_anomalous: Sequence[bool],
    p_values: Sequence[float],
    top_k_means: Sequence[float],
    voxel_mm3: Sequence[float],
    alpha: float,
) -> dict[str, Any]:
    """The figures above, for scans on their own grids (``truths`` and ``masks`` share each scan's grid)."""
    lesioned = np.array([bool(np.asarray(t).any()) for t in truths])
    flagged = np.asarray(is_anomalous, bool)
    n_normal, n_lesioned = int((~lesioned).sum()), int(lesioned.sum())
    fdp, fp_clusters, hits = [], [], []
    for t, m, mm3 in zip(truths, masks, voxel_mm3, strict=True):
        t, m = np.asarray(t) > 0, np.asarray(m, bool)
        fp_clusters.append(false_clusters(t, m))
        if t.any():
            fdp.append(float((m & ~t).sum()) / max(int(m.sum()), 1))
            hits += lesion_hits(t, m, mm3)
    fp_clusters_arr = np.array(fp_clusters)
    p_arr = np.asarray(p_values, np.float64)
    k = int(flagged[~lesioned].sum())
    out: dict[str, Any] = {
        "alpha": alpha,
        "n_normal_scans": n_normal,
        "n_lesioned_scans": n_lesioned,
        "normal_flagged_fraction": k / n_normal if n_normal else float("nan"),
        "normal_flagged_fraction_ci": binomial_ci(k, n_normal),
        "lesioned_flagged_fraction": float(flagged[lesioned].mean()) if n_lesioned else float("nan"),
        "voxel_fdr_lesioned": float(np.mean(fdp)) if fdp else float("nan"),
        "fp_clusters_per_normal_scan": float(fp_clusters_arr[~lesioned].mean()) if n_normal else float("nan"),
        "normal_scans_with_fp_cluster": float((fp_clusters_arr[~lesioned] > 0).mean())
        if n_normal
        else float("nan"),
        "fp_clusters_per_lesioned_scan": float(fp_clusters_arr[lesioned].mean())
        if n_lesioned
        else float("nan"),
        "scan_auroc_p_value": _auroc(lesioned.astype(int), -p_arr)
        if np.isfinite(p_arr).all()
        else float("nan"),
        "scan_auroc_top_k_mean": _auroc(lesioned.astype(int), np.asarray(top_k_means, np.float64)),
    }
    for name, (lo, hi) in SIZE_BINS_CM3.items():
        found = [h for size, h in hits if lo <= size < hi]
        out[f"lesion_sensitivity_{name}_cm3"] = float(np.mean(found)) if found else float("nan")
        out[f"n_lesions_{name}_cm3"] = len(found)
    return out


def result_guarantees(
    results: Sequence[Any], truths: Sequence[np.ndarray], top_k: Sequence[float]
) -> dict[str, Any]:
    """:func:`guarantee_metrics` of scored scans (:class:`~anomaly3d_core.detector.ScoreResult`), keys
    ``guarantee_*``; ``top_k``: each scan's top-1 % mean score on its working grid (the AUROC reference)."""
    found = guarantee_metrics(
        truths,
        [r.mask for r in results],
        [r.is_anomalous for r in results],
        [r.p_value for r in results],  # NaN without calibration nulls: no p-value AUROC
        top_k,
        [float(abs(np.linalg.det(np.asarray(r.volume.affine)[:3, :3]))) for r in results],
        results[0].alpha,
    )
    return {f"guarantee_{k}": v for k, v in found.items()}
