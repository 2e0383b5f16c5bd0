"""The pyfunc model class that MLflow serves: base64 scans in, scores and score maps out."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from anomaly3d_core.errors import DataError
from anomaly3d_core.io.files import check_volume
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.mlops.serving import decode_nifti, encode_nifti
from anomaly3d_core.persistence import load_detector


class Anomaly3DModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a saved :class:`AnomalyDetectionPipeline`."""

    def load_context(self, context: Any) -> None:
        self.pipeline = load_detector(context.artifacts["pipeline"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if "volume" not in getattr(model_input, "columns", []):
            raise MlflowException(
                "request rows need a 'volume' field (base64 .nii/.nii.gz)", error_code=INVALID_PARAMETER_VALUE
            )
        rows = []
        for i, text in enumerate(model_input["volume"]):
            try:
                img = decode_nifti(text)
                volume = check_volume(Volume(np.asanyarray(img.dataobj), img.affine, f"row {i}"))
                result = self.pipeline.score(volume)
            except (ValueError, DataError) as exc:
                raise MlflowException(f"row {i}: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
            rows.append(
                {
                    "volume_score": float(result.volume_score),
                    "is_anomalous": bool(result.is_anomalous),
                    "threshold": float(result.threshold),
                    "score_map": encode_nifti(result.score_map, volume.affine),
                }
            )
        return pd.DataFrame(rows, columns=["volume_score", "is_anomalous", "threshold", "score_map"])
