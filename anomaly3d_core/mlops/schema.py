"""The columns of a request row and of a response row, and the MLflow signature that documents them.

A row holds its scan as ``volume`` (base64) or ``path`` (a path or URI), or, for a model of several
sequences, one base64 column per sequence (``T1w``, ``FLAIR``, ...); every reader of a row is
:func:`anomaly3d_core.mlops.rows.read_row`. The response is the ``scores.csv`` row
(:data:`SCORES_COLUMNS`, also what ``anomaly3d score`` writes) plus ``seconds`` and ``error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomaly3d_core.preprocess.registration import QUALITY_KEYS

REQUEST_COLUMNS = ("volume", "path", "format", "out_dir")
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
RESPONSE_COLUMNS = (*SCORES_COLUMNS, "seconds", "error")  # error: "" when the row was scored
INLINE_COLUMNS = ("volume_score", "is_anomalous", "threshold", "score_map")  # a request of base64 scans
STRING_COLUMNS = ("file", "subject", "session", "score_map", "mask", "error")


def request_columns(channels: Sequence[str] = ()) -> tuple[str, ...]:
    """The request columns of a model: one base64 column per sequence for a model of several."""
    if len(channels) > 1:
        return (*channels, "format", "out_dir")
    return REQUEST_COLUMNS


def signature(channels: Sequence[str] = ()) -> Any:
    """Inputs: :func:`request_columns` (a sequence's column required, the rest optional); outputs:
    :data:`RESPONSE_COLUMNS`, of which a request of base64 scans only gets :data:`INLINE_COLUMNS`."""
    from mlflow.models import ModelSignature  # imported on save only: runner reads the columns above
    from mlflow.types import ColSpec, Schema

    kinds = {"is_anomalous": "boolean", **dict.fromkeys(STRING_COLUMNS, "string")}
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", name, required=len(channels) > 1 and name in channels)
                for name in request_columns(channels)
            ]
        ),
        outputs=Schema(
            [
                ColSpec(kinds.get(name, "double"), name, required=name in INLINE_COLUMNS)
                for name in RESPONSE_COLUMNS
            ]
        ),
    )
