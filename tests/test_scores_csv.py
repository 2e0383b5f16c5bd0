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


def test_one_row_builder_for_the_csv_the_server_and_spark(tmp_path):
    """The served response is the written row with NaN for empty numbers, and Spark's CSV row is that
    response turned back: the same cells as ``anomaly3d score`` writes, no number computed twice."""
    import math

    from anomaly3d_core.mlops.spark import csv_row
    from anomaly3d_core.scores import as_response

    registered = SimpleNamespace(
        registration=[1.0] * 15, registration_dice=0.97123456, registration_metric=-1.23
    )
    for record in (registered, SimpleNamespace(registration=None)):
        result = _result(record)
        result.volume_score, result.p_value = 1.23456789, math.nan
        written = write_result(result, tmp_path, "a")
        response = as_response(written)
        assert math.isnan(response["p_value"]) and written["p_value"] == ""
        assert all(k in response for k in ("registration_dice", "registration_metric"))
        absolute = {
            **response,
            **{k: str(tmp_path / v) for k, v in written.items() if k.endswith(("map", "mask")) and v},
        }
        spark = csv_row(absolute, tmp_path)
        assert {k: v for k, v in spark.items() if k in written} == written
        assert spark["volume_score"] == 1.234568 and spark["registration_dice"] == written.get(
            "registration_dice", ""
        )
