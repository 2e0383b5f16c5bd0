"""Calibrated verdicts: conformal p-values, Benjamini–Hochberg, cluster inference, lesion tables."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
from scipy import ndimage, stats

from anomaly3d_core.config import ThresholdConfig
from anomaly3d_core.errors import ConfigError, DataError
from anomaly3d_core.postprocess.calibration import (
    bh_mask,
    calibration_warning,
    conformal_p,
    min_calibration_scans,
)
from anomaly3d_core.postprocess.lesions import LESION_COLUMNS, lesion_table, write_lesion_table
from anomaly3d_core.postprocess.postprocessor import PostProcessor, depth_band
from anomaly3d_core.postprocess.verdict import conformal_threshold

SHAPE = (28, 28, 28)
FG = np.zeros(SHAPE, bool)
FG[3:-3, 3:-3, 3:-3] = True
UNIT = (1.0, 1.0, 1.0)


def noise_map(rng: np.random.Generator) -> np.ndarray:
    """Smooth unit-variance noise inside the foreground: a normal scan's final scores."""
    m = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.2)
    return (m / m[FG].std()).astype(np.float32)


def calibrated(rng: np.random.Generator, n: int, **config) -> PostProcessor:
    post = PostProcessor(ThresholdConfig(smoothing_sigma=0.0, **config))
    return post.calibrate([noise_map(rng) for _ in range(n)], [FG] * n, [UNIT] * n)


def test_conformal_p_value_formula_and_threshold():
    null = np.array([1.0, 2.0, 3.0, 4.0])
    assert conformal_p(3.0, null) == pytest.approx(3 / 5)  # (1 + #{1,2,3,4 >= 3}) / (4 + 1)
    assert conformal_p(5.0, null) == pytest.approx(1 / 5)
    assert conformal_p(0.0, null) == 1.0
    null19 = np.arange(19.0)
    assert conformal_threshold(null19, 0.05) == 18.0  # p <= 0.05 only above the largest of 19
    assert conformal_p(18.5, null19) == pytest.approx(0.05) and conformal_p(18.0, null19) == pytest.approx(
        0.1
    )
    assert conformal_threshold(np.arange(18.0), 0.05) == math.inf  # 1/19 > 0.05: unreachable


def test_too_few_calibration_scans_warn(caplog):
    assert min_calibration_scans(0.05) == 19 and min_calibration_scans(0.1) == 9
    assert calibration_warning(19, 0.05) is None
    assert "at least 19" in calibration_warning(18, 0.05)
    with caplog.at_level(logging.WARNING):
        post = calibrated(np.random.default_rng(0), 4)
    assert "4 calibration normal scan(s)" in caplog.text
    assert post.n_calibration == 4 and post.scan_threshold == post.volume_threshold_  # the uncalibrated one


def test_flagged_fraction_on_normal_noise_is_close_to_alpha():
    """Marginal over calibration sets: P(flag a normal scan) = floor(alpha (n+1)) / (n+1) = 0.1 here."""
    rng = np.random.default_rng(1)
    flagged, clusters_hit = [], []
    for _ in range(6):
        post = calibrated(rng, 19, alpha=0.1)
        for _ in range(20):
            v = post.verdict(noise_map(rng), FG, UNIT)
            assert v.is_anomalous == (v.p_value <= 0.1) == (v.volume_score > v.volume_threshold)
            flagged.append(v.is_anomalous)
            clusters_hit.append(bool(v.mask.any()))
    rate = float(np.mean(flagged))
    assert 0.04 <= rate <= 0.17, rate  # 120 scans: binomial sd 0.027 around 0.1
    # default scan statistic = largest cluster mass, so a flagged scan is one with a significant cluster
    assert flagged == clusters_hit


def test_top_k_mean_statistic_is_calibrated_too():
    rng = np.random.default_rng(2)
    post = calibrated(rng, 39, alpha=0.1, scan_statistic="top_k_mean")
    rates = [post.verdict(noise_map(rng), FG, UNIT).is_anomalous for _ in range(60)]
    assert 0.0 < np.mean(rates) <= 0.25
    lesioned = noise_map(rng)
    lesioned[8:16, 8:16, 8:16] += 4.0
    v = post.verdict(lesioned, FG, UNIT)
    assert v.scan_statistic == "top_k_mean" and v.is_anomalous and v.p_value == pytest.approx(1 / 40)


def test_voxel_p_values_are_uniform_on_normal_voxels():
    rng = np.random.default_rng(3)
    post = calibrated(rng, 20)
    bands = depth_band(FG, UNIT)
    p = post.null_.voxel_p(noise_map(rng), FG, bands)[FG]
    assert p.min() > 0
    for level in (0.01, 0.05, 0.2, 0.5):
        assert abs(float((p <= level).mean()) - level) < 0.35 * level + 0.005, level
    assert (post.null_.voxel_p(noise_map(rng), FG, bands)[~FG] == 1).all()


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(4)
    p = rng.uniform(size=(10, 10, 10))
    p[:3, :3, :3] = rng.uniform(0, 1e-3, size=(3, 3, 3))
    within = np.ones(p.shape, bool)
    within[-1] = False
    for q in (0.05, 0.1, 0.2):
        expected = np.zeros(p.shape, bool)
        expected[within] = stats.false_discovery_control(p[within], method="bh") <= q
        got = bh_mask(p, within, q)
        np.testing.assert_array_equal(got, expected)
        assert got[:3, :3, :3].all() and not got[-1].any()
    assert not bh_mask(np.ones((4, 4, 4)), np.ones((4, 4, 4), bool), 0.1).any()


def test_cluster_inference_controls_family_wise_error_on_noise_and_finds_a_blob():
    rng = np.random.default_rng(5)
    any_false = []
    for _ in range(4):
        post = calibrated(rng, 19, alpha=0.1)
        any_false += [bool(post.verdict(noise_map(rng), FG, UNIT).mask.any()) for _ in range(25)]
    assert 0.03 <= np.mean(any_false) <= 0.18, np.mean(any_false)  # FWER 0.1 (100 noise scans)
    scores = noise_map(rng)
    scores[10:15, 10:15, 10:15] += 5.0
    v = post.verdict(scores, FG, UNIT)
    assert v.mask_rule == "cluster" and v.mask[10:15, 10:15, 10:15].mean() > 0.9
    assert v.labels.max() == 1 and v.cluster_p[0] == pytest.approx(1 / 20)


def test_fdr_rule_and_calibration_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    post = calibrated(rng, 10, mask_rule="fdr", fdr_q=0.1)
    scores = noise_map(rng)
    scores[10:16, 10:16, 10:16] += 6.0
    v = post.verdict(scores, FG, UNIT)
    expected = bh_mask(v.p_map, FG, 0.1)
    np.testing.assert_array_equal(v.mask, expected)
    assert v.mask[11:15, 11:15, 11:15].all() and np.isnan(v.cluster_p).all()
    post.save(tmp_path)
    again, _ = PostProcessor.load(tmp_path, post.config)
    np.testing.assert_array_equal(again.verdict(scores, FG, UNIT).p_map, v.p_map)
    assert again.n_calibration == 10


def test_non_finite_scores_are_errors_not_decisions():
    post = calibrated(np.random.default_rng(7), 5)
    scores = noise_map(np.random.default_rng(8))
    scores[10, 10, 10] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        post.verdict(scores, FG, UNIT)
    scores[10, 10, 10] = np.inf
    with pytest.raises(DataError, match="non-finite"):
        post.verdict(scores, FG, UNIT)
    with pytest.raises(ValueError, match="non-finite"):
        conformal_p(float("nan"), np.arange(5.0))
    scores[10, 10, 10] = 0.0
    scores[0, 0, 0] = np.nan  # outside the foreground: never read
    assert post.verdict(scores, FG, UNIT).p_value > 0


def test_lesion_table_coordinates_against_a_known_affine(tmp_path):
    affine = np.array([[2.0, 0, 0, -10.0], [0, 3.0, 0, 5.0], [0, 0, 1.5, 20.0], [0, 0, 0, 1]])
    labels = np.zeros((20, 20, 20), np.int32)
    labels[4:7, 4:7, 4:7] = 1  # 27 voxels of 9 mm³, centre voxel (5, 5, 5)
    labels[12:14, 10, 10] = 2
    scores = np.zeros(labels.shape, np.float32)
    scores[6, 4, 5] = 9.0
    scores[13, 10, 10] = 4.0
    p = np.where(labels > 0, 0.01, 1.0).astype(np.float32)
    p[6, 4, 5] = 1e-5
    mni = np.diag([1.0, 1.0, 1.0, 1.0])
    rows = lesion_table(labels, scores, p, affine, np.array([0.02, 0.04]), labels, scores, mni)
    first = rows[0]
    assert first["volume_mm3"] == pytest.approx(27 * 9.0)
    assert (first["centre_x"], first["centre_y"], first["centre_z"]) == pytest.approx((0.0, 20.0, 27.5))
    assert (first["peak_x"], first["peak_y"], first["peak_z"]) == pytest.approx((2.0, 17.0, 27.5))
    assert (
        first["peak_score"] == 9.0 and first["peak_p"] == pytest.approx(1e-5) and first["cluster_p"] == 0.02
    )
    assert (first["peak_mni_x"], first["peak_mni_y"], first["peak_mni_z"]) == (6.0, 4.0, 5.0)
    assert rows[1]["centre_x"] == pytest.approx(2.0 * 12.5 - 10.0) and rows[1]["volume_mm3"] == pytest.approx(
        18.0
    )
    no_mni = lesion_table(labels, scores, p, affine)
    assert math.isnan(no_mni[0]["centre_mni_x"]) and math.isnan(no_mni[0]["cluster_p"])
    write_lesion_table(no_mni, tmp_path / "l.tsv")
    table = list(csv.DictReader(open(tmp_path / "l.tsv"), delimiter="\t"))
    assert tuple(table[0]) == LESION_COLUMNS and table[0]["centre_mni_x"] == "n/a"
    assert float(table[0]["volume_mm3"]) == 243.0


# ---------------------------------------------------------------------- through a fitted detector
def _test_scans(demo_dir):
    return sorted((demo_dir / "test").glob("*.nii.gz"))[:2]


def test_score_outputs_carry_named_decision_columns(fitted, demo_dir, tmp_path):
    import json

    from anomaly3d_core.io.derivatives import write_sidecar
    from anomaly3d_core.mlops.rows import score_row
    from anomaly3d_core.mlops.schema import RESPONSE_COLUMNS, SCORES_COLUMNS
    from anomaly3d_core.mlops.spark import csv_row
    from anomaly3d_core.runner import score_files

    scans = _test_scans(demo_dir)
    batch = score_files(fitted, scans, tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert tuple(rows[0]) == SCORES_COLUMNS and "threshold" not in rows[0]
    n = fitted.postprocessor_.n_calibration
    # the tiny demo set calibrates on fewer normals than alpha 0.05 needs (19): p-values are still
    # reported (of the top-k mean), the decision and mask are the uncalibrated thresholds'
    assert n < 19
    null = fitted.postprocessor_.null_.null_stats_["top_k_mean"]
    for row in rows:
        assert int(row["n_calibration"]) == n and float(row["alpha"]) == 0.05
        expected = (1 + np.count_nonzero(null >= float(row["volume_score"]))) / (n + 1)
        assert float(row["p_value"]) == pytest.approx(expected, abs=1e-6)
        assert row["is_anomalous"] == str(float(row["volume_score"]) > float(row["volume_threshold"]))
        assert float(row["volume_threshold"]) == pytest.approx(
            fitted.postprocessor_.volume_threshold_, abs=1e-5
        )
        assert float(row["voxel_threshold"]) == pytest.approx(fitted.threshold_, abs=1e-5)
        assert row["scan_statistic"] == "top_k_mean" and row["mask_rule"] == "threshold"
        assert (tmp_path / "out" / row["p_map"]).is_file()
        table = list(csv.DictReader(open(tmp_path / "out" / row["lesion_table"]), delimiter="\t"))
        assert len(table) == int(row["n_lesions"])
    served = score_row({"path": str(scans[0])}, 0, fitted)
    assert tuple(served) == RESPONSE_COLUMNS
    assert served["p_value"] == pytest.approx(float(rows[0]["p_value"]), abs=1e-6)
    assert served["lesion_table"].startswith("cluster\tvolume_mm3")  # no out_dir: the TSV's text
    spark_out = tmp_path / "spark"
    spark = csv_row(score_row({"path": str(scans[0]), "out_dir": str(spark_out)}, 0, fitted), spark_out)
    assert spark["p_value"] == pytest.approx(float(rows[0]["p_value"]), abs=1e-6)
    assert spark["volume_threshold"] == pytest.approx(float(rows[0]["volume_threshold"]), abs=1e-5)
    assert spark["p_map"] == rows[0]["p_map"]
    write_sidecar(tmp_path / "side.json", batch.rows[0], "model", [])
    sidecar = json.loads((tmp_path / "side.json").read_text())
    assert sidecar["PValue"] == pytest.approx(float(rows[0]["p_value"])) and sidecar["Alpha"] == 0.05
    assert (
        sidecar["VolumeThreshold"] == pytest.approx(float(rows[0]["volume_threshold"]))
        and "Threshold" not in sidecar
    )
    assert sidecar["VoxelThreshold"] == batch.rows[0]["voxel_threshold"]


def test_a_model_saved_before_calibration_nulls_loads_and_reports_no_p_value(
    saved_model, demo_dir, tmp_path, caplog
):
    import shutil

    from anomaly3d_core.persistence import load_detector
    from anomaly3d_core.runner import write_result

    old = tmp_path / "old"
    shutil.copytree(saved_model, old)
    files = next(old.rglob("calibration.npz"))
    files.unlink()
    with caplog.at_level(logging.WARNING):
        model = load_detector(old)
    assert "saved before calibration nulls" in caplog.text
    result = model.score(_test_scans(demo_dir)[0])
    assert math.isnan(result.p_value) and result.p_map is None and result.mask_rule == "threshold"
    legacy = model.postprocessor_.volume_threshold_
    assert result.volume_threshold == legacy and result.is_anomalous == (result.volume_score > legacy)
    row = write_result(result, tmp_path, "scan")
    assert row["p_value"] == "" and row["p_map"] == "" and row["n_calibration"] == 0


def test_a_non_finite_score_fails_the_scan_instead_of_deciding(fitted, demo_dir, tmp_path, monkeypatch):
    from anomaly3d_core.runner import score_files

    monkeypatch.setattr(fitted, "score_prepared", lambda prep: np.full(prep.mask.shape, np.nan, np.float32))
    scan = _test_scans(demo_dir)[0]
    with pytest.raises(DataError, match="NaN or infinite voxel scores; no decision made"):
        fitted.score(scan)
    batch = score_files(fitted, [scan], tmp_path)
    assert not batch.rows and "no decision made" in batch.failures.report()


def test_cross_fitting_calibrates_on_every_training_normal_scored_by_a_model_without_it(demo_dir):
    from conftest import FAST

    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    config = {**FAST, "training": {**FAST["training"], "num_epochs": 2, "calibration_folds": 2}}
    pipe = AnomalyDetectionPipeline(config).fit(list_inputs(demo_dir / "train"), show_progress=False)
    assert pipe.postprocessor_.n_calibration == 4 and pipe.n_val_volumes_ == 1
    scored = [s for fold in pipe.crossfit_ for s in fold["scored"]]
    assert sorted(scored) == sorted(str(p) for p in list_inputs(demo_dir / "train"))
    for fold in pipe.crossfit_:
        assert not set(fold["scored"]) & set(fold["trained_on"]) and len(fold["trained_on"]) == 2
    with pytest.raises(ConfigError, match="calibration_folds: 5"):
        AnomalyDetectionPipeline({**config, "training": {**config["training"], "calibration_folds": 5}}).fit(
            list_inputs(demo_dir / "train"), show_progress=False
        )
