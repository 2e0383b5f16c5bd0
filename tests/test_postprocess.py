"""The post-processor: per-scan scale, normative statistics, calibration, decisions and persistence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from anomaly3d_core.config import ThresholdConfig
from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError
from anomaly3d_core.postprocess.postprocessor import PostProcessor, depth_band, robust_standardize


def _scan(seed: int, scale: float, lesion: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = np.abs(rng.normal(size=(20, 20, 20))).astype(np.float32) * scale
    if lesion:
        scores[8:12, 8:12, 8:12] += 6 * scale
    return scores


def test_robust_scale_makes_scans_of_different_units_comparable():
    fg = np.ones((20, 20, 20), bool)
    a, b = robust_standardize(_scan(0, 1.0), fg), robust_standardize(_scan(0, 7.0), fg)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    z = robust_standardize(_scan(1, 1.0), fg)
    assert abs(float(np.median(z))) < 1e-6
    # the lesion stands out on the scan's own scale whatever its units
    with_lesion = robust_standardize(_scan(2, 50.0, lesion=True), fg)
    assert with_lesion[10, 10, 10] > 5 and float(np.median(with_lesion)) < 0.2
    # a constant map has no spread: no division by zero
    assert np.isfinite(robust_standardize(np.ones((4, 4, 4)), np.ones((4, 4, 4), bool))).all()


def test_pooled_decision_with_and_without_scan_normalization():
    fg = np.ones((20, 20, 20), bool)
    normals = [_scan(10 + i, scale) for i, scale in enumerate([1.0, 1.0, 8.0, 8.0])]
    lesioned_low_units = _scan(20, 1.0, lesion=True)
    normal_high_units = _scan(21, 8.0)
    for mode, expect_separated in [("none", False), ("robust", True)]:
        post = PostProcessor(ThresholdConfig(smoothing_sigma=0.0, scan_normalization=mode))
        maps = [post.transform(post.scan_scores(m, fg), fg) for m in normals]
        post.calibrate(maps, [fg] * len(maps))
        spacing = (1.0, 1.0, 1.0)
        lesion = post.decide(post.transform(post.scan_scores(lesioned_low_units, fg), fg), fg, spacing)
        normal = post.decide(post.transform(post.scan_scores(normal_high_units, fg), fg), fg, spacing)
        # decide -> (threshold, mask, volume score, anomalous)
        assert (lesion[2] > normal[2]) is expect_separated, mode
    assert lesion[3] and not normal[3]


def test_normative_statistics_and_their_grid_check(tmp_path):
    post = PostProcessor(ThresholdConfig(smoothing_sigma=0.0, normative=True))
    with pytest.raises(ConfigError, match="one grid"):
        post.check_shared_grid([(4, 4, 4), (5, 4, 4)])
    fg = np.ones((6, 6, 6), bool)
    post.fit_normative([_scan(i, 1.0)[:6, :6, :6] for i in range(5)])
    z = post.transform(np.full((6, 6, 6), 100.0, np.float32), fg)
    assert (z > 10).all()
    with pytest.raises(DataError, match="differs from the normative grid"):
        post.transform(np.zeros((5, 6, 6), np.float32), np.ones((5, 6, 6), bool), "scan.nii.gz")
    with pytest.raises(Anomaly3DError, match="not calibrated"):
        post.decide(z, fg, (1.0, 1.0, 1.0))
    post.calibrate([post.transform(_scan(9, 1.0)[:6, :6, :6], fg)], [fg])
    post.save(tmp_path, {"history": {"train_loss": [1.0]}})
    again, state = PostProcessor.load(tmp_path, post.config)
    assert state["history"] == {"train_loss": [1.0]}
    assert again.threshold_ == post.threshold_ and again.volume_threshold_ == post.volume_threshold_
    np.testing.assert_array_equal(again.normative_["mean"], post.normative_["mean"])


def _ball_scan(seed: int, lesion: bool = False, radius: float = 9.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores that are high near the foreground's edge (as patch residuals are), plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.indices((24, 24, 24)).astype(float) - 11.5
    fg = np.sqrt((grid**2).sum(0)) < radius
    depth = ndimage.distance_transform_edt(np.pad(fg, 1))[1:-1, 1:-1, 1:-1]
    scores = np.where(fg, 4.0 * np.exp(-depth / 1.5) + 0.3 * np.abs(rng.normal(size=fg.shape)), 0.0)
    if lesion:
        scores[10:13, 10:13, 10:13] += 2.0  # deep inside, weaker than the edge effect
    return scores.astype(np.float32), fg


def test_depth_normalization_removes_the_edge_effect():
    from sklearn.metrics import average_precision_score

    train = [_ball_scan(i, radius=8.0 + i) for i in range(4)]  # heads of different sizes
    test, fg = _ball_scan(9, lesion=True, radius=10.0)
    truth = np.zeros(fg.shape, bool)
    truth[10:13, 10:13, 10:13] = True
    aps = {}
    for depth in (False, True):
        post = PostProcessor(ThresholdConfig(smoothing_sigma=0.0, depth_normalization=depth))
        if depth:
            post.fit_depth([s for s, _ in train], [m for _, m in train], [(1.0, 1.0, 1.0)] * 4)
        final = post.transform(post.scan_scores(test, fg), fg)
        aps[depth] = average_precision_score(truth[fg], final[fg])
    assert aps[False] < 0.5 and aps[True] > 0.95, aps
    assert depth_band(np.ones((5, 5, 5), bool), (1.0, 1.0, 1.0))[2, 2, 2] == 3  # the array border is an edge
