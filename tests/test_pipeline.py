"""End to end on the demo data: the fitted pipeline finds lesions and calibrates on normals."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from sklearn.metrics import roc_auc_score

from anomaly3d_core.io import list_inputs


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
