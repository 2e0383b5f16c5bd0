"""The pyfunc model class that MLflow serves: base64 scans (any format a loader plugin reads) in,
scores and NIfTI score maps on the input's grid out.

Every failure reaches the client as a 4xx/5xx with one line naming the row and the reason, never
a traceback or a server path: bad input is a 400, anything unexpected a 500 whose details go to
the server's log only.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from anomaly3d_core.errors import Anomaly3DError, DataError
from anomaly3d_core.io.files import check_volume
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.mlops.serving import decode_bytes, encode_nifti, read_payload
from anomaly3d_core.persistence import load_detector

log = logging.getLogger("anomaly3d.serving")
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?")


class ServingError(MlflowException):
    """An error whose message MLflow's scoring server sends as it is.

    The server prefixes a model's error with the request data ("Failed to predict data '...'")
    by assigning to ``message``; here that assignment is ignored, so the client gets one line.
    """

    @property
    def message(self) -> str:
        return self._anomaly3d_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_anomaly3d_message"):
            self._anomaly3d_message = value


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line, without file-system paths, at most ``limit`` characters."""
    flat = " ".join(_PATH.sub("<path>", str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class Anomaly3DModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a saved detector (pipeline or ensemble)."""

    def load_context(self, context: Any) -> None:
        self.pipeline = load_detector(context.artifacts["pipeline"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        columns = getattr(model_input, "columns", [])
        channels = self.pipeline.channels
        wanted = channels if len(channels) > 1 else ["volume"]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ServingError(
                f"request rows need the field(s) {', '.join(repr(c) for c in missing)} (base64 of a scan file"
                + (", one per sequence" if len(wanted) > 1 else "")
                + "; 'format' names a non-NIfTI format)",
                error_code=INVALID_PARAMETER_VALUE,
            )
        formats = list(model_input["format"]) if "format" in columns else [None] * len(model_input)
        scans = model_input[wanted].to_dict("records") if len(wanted) > 1 else list(model_input["volume"])
        rows = []
        for i, (text, fmt) in enumerate(zip(scans, formats, strict=True)):
            try:
                rows.append(self._score_row(text, i, fmt))
            except ServingError:
                raise
            except DataError as exc:
                raise ServingError(f"row {i}: {one_line(exc.reason)}", INVALID_PARAMETER_VALUE) from None
            except (ValueError, Anomaly3DError) as exc:
                raise ServingError(f"row {i}: {one_line(str(exc))}", INVALID_PARAMETER_VALUE) from None
            except MemoryError:
                log.exception("row %d: out of memory", i)
                raise ServingError(
                    f"row {i}: the server ran out of memory scoring this volume", INTERNAL_ERROR
                ) from None
            except Exception as exc:  # never a traceback or a path to the client; the log has both
                log.exception("row %d: unexpected error", i)
                raise ServingError(
                    f"row {i}: internal error while scoring ({type(exc).__name__}); see the server log",
                    INTERNAL_ERROR,
                ) from None
        return pd.DataFrame(rows, columns=["volume_score", "is_anomalous", "threshold", "score_map"])

    def _score_row(self, text: Any, i: int, fmt: Any = None) -> dict[str, Any]:
        """Score one row: ``text`` is a base64 scan, or ``{sequence: base64}`` for several sequences."""
        registry = getattr(self.pipeline, "registry", None)
        if isinstance(text, dict):
            subject = {}
            for seq, item in text.items():
                subject[seq] = check_volume(
                    read_payload(decode_bytes(item, repr(seq)), fmt, registry, repr(seq))
                )
                subject[seq].path = f"row {i} {seq}"
            result = self.pipeline.score(Subject(f"row {i}", subject))
        else:
            volume = check_volume(read_payload(decode_bytes(text), fmt, registry, "'volume'"))
            volume.path = f"row {i}"
            result = self.pipeline.score(volume)
        volume = result.volume
        return {
            "volume_score": float(result.volume_score),
            "is_anomalous": bool(result.is_anomalous),
            "threshold": float(result.threshold),
            "score_map": encode_nifti(result.score_map, volume.affine),
        }
