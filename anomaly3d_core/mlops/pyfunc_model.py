"""The pyfunc model class that MLflow serves: scans (base64 in any format a loader plugin reads, one
column per sequence for a model of several, or paths/URIs) in, scores and NIfTI score maps on the
input's grid out.

An inline request (rows of base64 scans only) fails as a whole on a bad row: a 4xx/5xx with
one line naming the row and the reason, never a traceback or a server path: bad input is a 400,
anything unexpected a 500 whose details go to the server's log only. A batch request (a ``path``
or ``out_dir`` column, as Spark sends; see :mod:`.rows`) gives each bad row its own ``error`` and
scores the others, because one failed row would otherwise fail a whole Spark job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from anomaly3d_core.errors import Anomaly3DError, DataError
from anomaly3d_core.mlops.rows import failed_row, is_batch, names_files, response, score_row
from anomaly3d_core.mlops.schema import INLINE_COLUMNS, path_column
from anomaly3d_core.persistence import load_detector

log = logging.getLogger("anomaly3d.serving")
_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?")
THREADS_ENV = "ANOMALY3D_TORCH_THREADS"  # set by the Spark route so executors do not oversubscribe cores
# rows that name files make the model read and write where it runs: off on a server by default
FILES_ENV = "ANOMALY3D_ALLOW_PATHS"
_loaded: dict[tuple[str, int, int], Any] = {}  # the one detector this process holds (see load_context)


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
        threads = os.environ.get(THREADS_ENV)
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.pipeline = load_once(context.artifacts["pipeline"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        columns = getattr(model_input, "columns", [])
        channels = self.pipeline.channels
        if len(channels) > 1:  # per sequence a base64 column or a path column
            missing = [c for c in channels if c not in columns and path_column(c) not in columns]
            wanted = " or ".join(f"'{c}'/'{path_column(c)}'" for c in missing)
            detail = "base64 of a scan file, or its path or URI, per sequence"
        else:
            missing = [] if "volume" in columns or "path" in columns else ["volume"]
            wanted, detail = "'volume' or 'path'", "base64 of a scan file, or a path or URI the model reads"
        if missing:
            raise ServingError(
                f"request rows need the field(s) {wanted} ({detail}; 'format' names a non-NIfTI format)",
                error_code=INVALID_PARAMETER_VALUE,
            )
        records = model_input.to_dict("records")
        if os.environ.get(FILES_ENV) != "1" and names_files(records):
            raise ServingError(
                "rows with 'path' or 'out_dir' make the model read and write files where it runs; "
                f"that is off unless {FILES_ENV}=1 is set there (the Spark route sets it); send 'volume' instead",
                error_code=INVALID_PARAMETER_VALUE,
            )
        deadline = time.monotonic() + request_timeout()
        with scoring_slot(deadline):
            if is_batch(columns):
                return response([self._batch_row(row, i, deadline) for i, row in enumerate(records)])
            return response(
                [self._inline_row(row, i, deadline) for i, row in enumerate(records)], INLINE_COLUMNS
            )

    def _batch_row(self, row: dict[str, Any], i: int, deadline: float = math.inf) -> dict[str, Any]:
        if time.monotonic() > deadline:  # the client has been answered with a timeout: stop working for it
            return failed_row(row, i, f"not scored: the request ran past its {request_timeout():g} s limit")
        try:
            return score_row(row, i, self.pipeline)
        except DataError as exc:  # the row's `file` names the scan
            return failed_row(row, i, one_line(exc.reason))
        except (ValueError, Anomaly3DError) as exc:
            return failed_row(row, i, one_line(str(exc)))
        except MemoryError:
            log.exception("row %d: out of memory", i)
            return failed_row(row, i, "out of memory scoring this volume")
        except Exception as exc:  # one bad row never fails the batch; the log has the traceback
            log.exception("row %d: unexpected error", i)
            return failed_row(
                row, i, f"internal error while scoring ({type(exc).__name__}); see the worker log"
            )

    def _inline_row(self, row: dict[str, Any], i: int, deadline: float = math.inf) -> dict[str, Any]:
        if time.monotonic() > deadline:
            raise ServingError(
                f"row {i}: the request ran past its {request_timeout():g} s limit "
                f"({TIMEOUT_ENV}); send fewer rows per request",
                TEMPORARILY_UNAVAILABLE,
            )
        try:
            return score_row(row, i, self.pipeline, inline=True)
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


TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # the scoring server answers 504 after it
CONCURRENCY_ENV = "ANOMALY3D_SERVE_CONCURRENCY"  # requests one server process scores at once
_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_guard = threading.Lock()


def request_timeout() -> float:
    """Seconds a request may take, as the scoring server counts them (``mlflow models serve`` always
    sets it, default 60); no limit where the model runs outside a server (Spark, Python)."""
    try:
        return float(os.environ.get(TIMEOUT_ENV) or math.inf)
    except ValueError:
        return math.inf


@contextlib.contextmanager
def scoring_slot(deadline: float) -> Iterator[None]:
    """One of ``ANOMALY3D_SERVE_CONCURRENCY`` (default 1) scoring slots of this process, so concurrent
    requests queue instead of each holding its scans in memory at once; a request that cannot get
    one before its deadline is answered 503."""
    try:
        n = max(1, int(os.environ.get(CONCURRENCY_ENV) or 1))
    except ValueError:
        n = 1
    with _slots_guard:
        slot = _slots.setdefault(n, threading.BoundedSemaphore(n))
    if not slot.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise ServingError(
            f"the server is busy with other requests and this one waited past its {request_timeout():g} s "
            f"limit; retry later ({CONCURRENCY_ENV} sets how many are scored at once)",
            TEMPORARILY_UNAVAILABLE,
        )
    try:
        yield
    finally:
        slot.release()


def load_once(path: str) -> Any:
    """The detector at ``path``, loaded once per process: Spark loads the pyfunc model for every
    partition, and a worker process that scores many partitions keeps one copy, not one per load.
    Keyed on the folder's identity, so a model replaced in place is loaded afresh."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_mtime_ns)
    if key not in _loaded:
        _loaded.clear()  # one model per process: memory stays what one detector needs
        _loaded[key] = load_detector(path)
    return _loaded[key]
