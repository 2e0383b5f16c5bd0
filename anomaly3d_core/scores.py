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
    "volume_score",
    "is_anomalous",
    "threshold",
    "score_map",
    "mask",
    *QUALITY_KEYS,  # empty for scans that were not registered
)
