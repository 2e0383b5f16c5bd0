"""scores.csv carries each registered scan's registration quality."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np

from anomaly3d_core.detector import ScoreResult
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.runner import CSV_FIELDS, write_csv, write_result


def _result(record) -> ScoreResult:
    vol = Volume(np.ones((4, 4, 4), np.float32), np.eye(4), "scan.nii.gz")
    prepared = SimpleNamespace(record=record)
    return ScoreResult(
        vol, np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), bool), 1.0, False, 2.0, prepared
    )


def test_registration_quality_columns(tmp_path):
    registered = SimpleNamespace(
        registration=[1.0] * 15, registration_dice=0.9712345, registration_metric=-1.234567
    )
    rows = [
        write_result(_result(registered), tmp_path, "a"),
        write_result(_result(SimpleNamespace(registration=None)), tmp_path, "b"),
    ]
    write_csv(rows, tmp_path / "scores.csv")
    got = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert {"registration_dice", "registration_metric"} <= set(CSV_FIELDS)
    assert got[0]["registration_dice"] == "0.9712" and got[0]["registration_metric"] == "-1.2346"
    assert got[1]["registration_dice"] == "" and got[1]["score_map"] == "b_score.nii.gz"
