"""The ``scores.csv`` row: its columns and the one function that builds it (:func:`result_row`),
shared by ``anomaly3d score``, the served model and Spark.

The served model's response (:mod:`anomaly3d_core.mlops.schema`) is this row plus ``seconds`` and
``error``, with NaN for empty numbers (:func:`as_response`); Spark turns response rows back into
``scores.csv`` rows with :func:`as_csv_cells`, without computing any number again.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from anomaly3d_core.detector import ScoreResult
from anomaly3d_core.errors import DataError
from anomaly3d_core.preprocess.registration import QUALITY_KEYS, registration_quality

SCORES_COLUMNS = (
    "file",
    "subject",  # subject and session: for inputs with several sequences
    "session",
    "volume_score",  # the scan statistic named in scan_statistic
    "volume_threshold",  # decision_rule p_value <= alpha: the same as volume_score > volume_threshold
    "p_value",  # conformal, against the calibration normals; empty for a model without calibration nulls
    "alpha",
    "is_anomalous",
    "decision_rule",  # what decided is_anomalous: "p_value <= alpha" or "volume_score > volume_threshold (uncalibrated)"
    "scan_statistic",
    "n_calibration",  # how many normal scans calibrated the p-values
    "mask_rule",  # cluster (family-wise at alpha), fdr (Benjamini-Hochberg at threshold.fdr_q) or threshold
    "voxel_threshold",  # the calibrated voxel score threshold (the mask of mask_rule threshold)
    "n_lesions",
    "score_map",
    "p_map",
    "mask",
    "lesion_table",
    *QUALITY_KEYS,  # empty for scans that were not registered
)

FILE_COLUMNS = ("score_map", "p_map", "mask", "lesion_table")
NUMBER_COLUMNS = ("volume_score", "volume_threshold", "p_value", "alpha", "voxel_threshold", *QUALITY_KEYS)
INT_COLUMNS = ("n_calibration", "n_lesions")


def decision_columns(result: ScoreResult) -> dict[str, Any]:
    """The scan's numbers and decision as ``scores.csv``, the sidecar and the served response name them.

    A NaN or infinite volume score is an error (never a decision); an undefined p-value (a model
    without calibration nulls) is an empty cell.
    """
    if not np.isfinite(result.volume_score):
        raise DataError(
            result.volume.path, f"volume score {result.volume_score}: not a finite number, no decision"
        )

    def num(value: float) -> float | str:
        return round(float(value), 6) if np.isfinite(value) or np.isinf(value) else ""

    return {
        "volume_score": round(float(result.volume_score), 6),
        "volume_threshold": num(result.volume_threshold),
        "p_value": num(result.p_value),
        "alpha": num(result.alpha),
        "is_anomalous": bool(result.is_anomalous),
        "decision_rule": result.decision_rule,
        "scan_statistic": result.scan_statistic,
        "n_calibration": int(result.n_calibration),
        "mask_rule": result.mask_rule,
        "voxel_threshold": round(float(result.threshold), 6),
        "n_lesions": len(result.lesions),
    }


def result_row(result: ScoreResult, files: dict[str, str]) -> dict[str, Any]:
    """The ``scores.csv`` row of a scored scan whose outputs are ``files`` (by column, empty when not
    written): numbers rounded once, here (6 decimals; registration quality 4), empty cells for what a
    model or scan does not have."""
    return {
        "file": result.volume.path,
        **decision_columns(result),
        **{column: files.get(column, "") for column in FILE_COLUMNS},
        **{k: round(v, 4) for k, v in registration_quality(result.prepared).items()},
    }


def as_response(row: dict[str, Any]) -> dict[str, Any]:
    """A row with NaN for its empty numbers (every registration column present), as the server answers."""
    out = {k: math.nan if k in NUMBER_COLUMNS and v == "" else v for k, v in row.items()}
    return {**out, **{k: float(out.get(k, math.nan)) for k in QUALITY_KEYS}}


def as_csv_cells(row: dict[str, Any]) -> dict[str, Any]:
    """A response row's cells as ``scores.csv`` writes them: NaN as an empty cell, counts as integers."""
    out = {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    return {**out, **{k: int(out[k]) for k in INT_COLUMNS if k in out}}
