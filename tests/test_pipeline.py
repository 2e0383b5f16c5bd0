"""End to end on the demo data: the fitted pipeline finds lesions and calibrates on normals."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomaly3d_core.io.files import list_inputs


def test_detects_lesions_on_demo_data(fitted, demo_dir):
    truths, scores = [], []
    for scan in list_inputs(demo_dir / "test"):
        result = fitted.score(scan)
        gt = nib.load(demo_dir / "test_masks" / scan.name).get_fdata() > 0
        brain = result.volume.array > 0
        truths.append(gt[brain])
        scores.append(result.score_map[brain])
    auc = roc_auc_score(np.concatenate(truths), np.concatenate(scores))
    assert auc > 0.8, auc


def test_threshold_calibrated_on_normals(fitted):
    assert fitted.threshold_ > fitted.score_stats_["mean"]
    assert len(fitted.normal_volume_scores_) == fitted.n_val_volumes_ >= 1
    assert fitted.volume_threshold_ > 0


def test_evaluate_seed_api(fitted, demo_dir):
    scans = list_inputs(demo_dir / "test")
    masks = [demo_dir / "test_masks" / s.name for s in scans]
    metrics = fitted.evaluate(scans, masks)
    assert {"pixel_auc", "pixel_iou", "pixel_dice"} <= set(metrics)
    assert 0 <= metrics["pixel_dice"] <= 1


def test_normative_scoring_on_a_shared_grid(demo_dir, tmp_path):
    from conftest import FAST

    from anomaly3d_core.errors import ConfigError
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    shared = {
        **FAST,
        "data": {"preprocessing": {"target_spacing": 4.0, "crop_foreground": False, "pad_multiple": 1}},
        "threshold": {"normative": True},
    }
    pipe = AnomalyDetectionPipeline(shared).fit(list_inputs(demo_dir / "train"), show_progress=False)
    assert (
        pipe.postprocessor_.normative_["mean"].shape
        == pipe.prepare(list_inputs(demo_dir / "train")[0]).array.shape
    )
    scan = list_inputs(demo_dir / "test")[-1]
    result = pipe.score(scan)
    assert (result.score_map >= 0).all() and result.score_map.max() > 0
    again = AnomalyDetectionPipeline.load(pipe.save(tmp_path / "m"))
    assert np.array_equal(again.score(scan).score_map, result.score_map)
    from conftest import blob_volume

    from anomaly3d_core.io.volume import Volume

    odd = Volume(blob_volume((30, 30, 30)), np.diag([4.0, 4.0, 4.0, 1.0]))  # a scan on another grid
    with pytest.raises(ConfigError, match="normative needs every scan on one grid"):
        AnomalyDetectionPipeline(shared).fit([*list_inputs(demo_dir / "train"), odd], show_progress=False)
