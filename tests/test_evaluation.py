"""Thresholds, post-processing and metrics, checked against scikit-learn and known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly3d_core.config import PostprocessConfig
from anomaly3d_core.evaluation.metrics import (
    bootstrap_ci,
    comprehensive_evaluation,
    compute_optimal_threshold,
    hist_metrics,
    lesion_detection,
    quantile_edges,
    volume_histograms,
)
from anomaly3d_core.postprocess.thresholding import (
    apply_threshold,
    compute_threshold_from_normal_scores,
    multi_threshold_analysis,
    postprocess_mask,
    volume_score,
)


def _maps(seed=0, n=4, shape=(12, 12, 12)):
    rng = np.random.default_rng(seed)
    gts, maps = [], []
    for i in range(n):
        gt = np.zeros(shape, bool)
        if i:
            gt[2 : 2 + 2 * i, 3:7, 4:8] = True
        maps.append(rng.normal(0, 1, shape) + 2.0 * gt)
        gts.append(gt)
    return gts, maps


def test_pooled_metrics_match_sklearn():
    gts, maps = _maps()
    m = comprehensive_evaluation(gts, maps, threshold=1.0, n_bootstrap=50)
    y = np.concatenate([g.ravel() for g in gts])
    s = np.concatenate([x.ravel() for x in maps])
    assert m["pixel_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    pred = s > 1.0
    tp = (pred & y).sum()
    assert m["pixel_dice"] == pytest.approx(2 * tp / (pred.sum() + y.sum()))
    assert m["pixel_iou"] == pytest.approx(tp / (pred | y).sum())
    per = [roc_auc_score(g.ravel(), x.ravel()) for g, x in zip(gts, maps, strict=True) if g.any()]
    assert m["per_volume_auc_mean"] == pytest.approx(np.mean(per))
    lo, hi = m["pixel_auc_ci"]
    assert lo <= m["pixel_auc"] <= hi


def test_histogram_metrics_close_to_exact():
    gts, maps = _maps(seed=3, n=6, shape=(20, 20, 20))
    scores = [x.ravel() for x in maps]
    truths = [g.ravel() for g in gts]
    edges = quantile_edges(scores)
    pos, neg = volume_histograms(truths, scores, edges)
    h = hist_metrics(pos.sum(0), neg.sum(0))
    y, s = np.concatenate(truths), np.concatenate(scores)
    exact = roc_auc_score(y, s)
    assert abs(h["auc"] - exact) <= h["auc_error_bound"] + 1e-9
    assert h["ap"] == pytest.approx(average_precision_score(y, s), abs=0.01)
    ci = bootstrap_ci(pos, neg, n_boot=100)
    assert ci["auc"][0] < exact < ci["auc"][1]


def test_perfect_map_scores_one():
    gts, _ = _maps()
    perfect = [g.astype(float) for g in gts]
    m = comprehensive_evaluation(
        gts,
        perfect,
        threshold=0.5,
        volume_scores=[g.sum() for g in gts],
        volume_threshold=0.5,
        n_bootstrap=20,
    )
    assert m["pixel_auc"] == 1.0 and m["pixel_ap"] == 1.0 and m["pixel_dice"] == 1.0 and m["pixel_iou"] == 1.0
    assert m["pixel_best_dice"] == pytest.approx(1.0)
    assert m["volume_auroc"] == 1.0 and m["volume_accuracy"] == 1.0 and m["volume_f1"] == 1.0
    assert m["lesion_sensitivity"] == 1.0 and m["lesion_fp"] == 0


def test_lesion_detection_counts():
    gt = np.zeros((20, 20, 20), bool)
    gt[2:5, 2:5, 2:5] = True  # found
    gt[12:15, 12:15, 12:15] = True  # missed
    pred = np.zeros_like(gt)
    pred[3, 3, 3] = True
    pred[8:10, 2:4, 15:17] = True  # false positive
    assert lesion_detection(gt, pred) == {"tp": 1, "fn": 1, "fp": 1}


def test_optimal_threshold():
    gts, maps = _maps(seed=1)
    t, f1 = compute_optimal_threshold(gts, maps, metric="f1")
    y = np.concatenate([g.ravel() for g in gts])
    s = np.concatenate([m.ravel() for m in maps])
    pred = s > t
    assert f1 == pytest.approx(2 * (pred & y).sum() / (pred.sum() + y.sum()), rel=1e-9)
    for other in np.linspace(-1, 3, 21):
        p = s > other
        assert 2 * (p & y).sum() / (p.sum() + y.sum()) <= f1 + 1e-12
    t_y, j = compute_optimal_threshold(gts, maps, metric="youden")
    assert 0 < j <= 1
    with pytest.raises(ValueError, match="did you mean 'dice'"):
        compute_optimal_threshold(gts, maps, metric="dise")


@pytest.mark.parametrize(
    ("method", "kwargs", "expected"),
    [
        ("percentile", {"percentile": 97.5}, 1.95996),
        ("sigma", {"sigma_multiplier": 2.0}, 2.0),
        ("mad", {"sigma_multiplier": 2.0}, 2.0),
        ("iqr", {"k": 1.5}, 2.69796),
    ],
)
def test_normal_thresholds_on_standard_normal(method, kwargs, expected):
    scores = np.random.default_rng(0).standard_normal(400_000)
    assert compute_threshold_from_normal_scores(scores, method=method, **kwargs) == pytest.approx(
        expected, abs=0.03
    )


@pytest.mark.parametrize("method", ["otsu", "triangle", "yen"])
def test_adaptive_thresholds_split_two_modes(method):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 0.5, 20_000), rng.normal(6, 0.5, 2_000)])
    t = compute_threshold_from_normal_scores(scores, method=method)
    assert t > 1.0 and t < 5.5


def test_apply_threshold_and_postprocess_removes_small_components():
    scores = np.zeros((20, 20, 20))
    scores[2:8, 2:8, 2:8] = 5  # 216 voxels
    scores[15, 15, 15] = 5  # a single voxel
    scores[12:14, 3:5, 3:5] = 5  # 8 voxels
    mask = apply_threshold(scores, 1.0)
    assert mask.sum() == 225
    # 2 mm voxels are 8 mm3: the lone voxel (8 mm3) goes, the 8-voxel blob (64 mm3) stays
    cleaned = postprocess_mask(mask, PostprocessConfig(min_component_mm3=40.0), spacing=(2.0, 2.0, 2.0))
    assert cleaned.sum() == 216 + 8 and not cleaned[15, 15, 15]
    largest = postprocess_mask(mask, PostprocessConfig(keep_largest=True))
    assert largest.sum() == 216
    fg = np.zeros_like(mask)
    fg[:10] = True
    assert postprocess_mask(mask, PostprocessConfig(), foreground=fg).sum() == 216
    opened = postprocess_mask(mask, PostprocessConfig(opening=1))
    assert not opened[15, 15, 15] and opened[5, 5, 5]


def test_volume_score_top_k_and_analysis():
    scores = np.arange(1000, dtype=float).reshape(10, 10, 10)
    assert volume_score(scores, top_k_fraction=0.01) == pytest.approx(np.mean(np.arange(990, 1000)))
    gt = scores > 900
    a = multi_threshold_analysis(scores, (0, 999), 11, ground_truth=gt)
    assert a["fraction_flagged"][0] == pytest.approx(0.999) and a["dice"].max() > 0.9
