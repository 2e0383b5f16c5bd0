"""The columns of a request row and of a response row, and the MLflow signature that documents them.

A row holds its scan as ``volume`` (base64) or ``path`` (a path or URI), or, for a model of several
sequences, per sequence a base64 column (``T1w``, ``FLAIR``, ...) or a path column (``T1w_path``) and
optionally ``subject`` (the name its outputs get); every reader of a row is
:func:`anomaly3d_core.mlops.rows.read_row`. The response is the ``scores.csv`` row
(:data:`SCORES_COLUMNS`, also what ``anomaly3d score`` writes) plus ``seconds`` and ``error``. Without
``out_dir`` the maps travel back as base64 ``.nii.gz`` and ``lesion_table`` holds the TSV's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomaly3d_core.scores import SCORES_COLUMNS

REQUEST_COLUMNS = ("volume", "path", "format", "out_dir")
RESPONSE_COLUMNS = (*SCORES_COLUMNS, "seconds", "error")  # error: "" when the row was scored
#: a request of base64 scans: the decision and how it was made, the score map (base64 ``.nii.gz``) and
#: the lesion table (the TSV's text; empty for a model without calibration nulls)
INLINE_COLUMNS = (
    "volume_score",
    "volume_threshold",
    "p_value",
    "alpha",
    "is_anomalous",
    "decision_rule",
    "scan_statistic",
    "n_calibration",
    "mask_rule",
    "voxel_threshold",
    "n_lesions",
    "score_map",
    "lesion_table",
)
STRING_COLUMNS = (
    "file",
    "subject",
    "session",
    "scan_statistic",
    "mask_rule",
    "decision_rule",
    "score_map",
    "p_map",
    "mask",
    "lesion_table",
    "error",
)


def path_column(sequence: str) -> str:
    """The column that names a sequence's file (path or URI) for a model of several sequences."""
    return f"{sequence}_path"


def request_columns(channels: Sequence[str] = ()) -> tuple[str, ...]:
    """The request columns of a model; for one of several sequences, per sequence a base64 column
    (``T1w``) or a path column (``T1w_path``), and ``subject`` to name a row's outputs."""
    if len(channels) > 1:
        return (*channels, *map(path_column, channels), "subject", "format", "out_dir")
    return REQUEST_COLUMNS


def signature(channels: Sequence[str] = ()) -> Any:
    """Inputs: :func:`request_columns` (all optional in the schema: each row needs its scans as base64
    or paths, which :func:`~anomaly3d_core.mlops.rows.read_row` checks with one clear line); outputs:
    :data:`RESPONSE_COLUMNS`, of which a request of base64 scans only gets :data:`INLINE_COLUMNS`."""
    from mlflow.models import ModelSignature  # imported on save only: runner reads the columns above
    from mlflow.types import ColSpec, Schema

    kinds = {"is_anomalous": "boolean", "n_calibration": "long", "n_lesions": "long"}
    kinds |= dict.fromkeys(STRING_COLUMNS, "string")
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(
                    "string", name, required=False
                )  # a scan comes as base64 or as a path: read_row checks
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
