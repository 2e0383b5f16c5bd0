"""The ``scores.csv`` row: its columns, shared by ``anomaly3d score``, the served model and Spark.

The served model's response (:mod:`anomaly3d_core.mlops.schema`) is this row plus ``seconds`` and
``error``.
"""

from __future__ import annotations

from anomaly3d_core.preprocess.registration import QUALITY_KEYS

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
