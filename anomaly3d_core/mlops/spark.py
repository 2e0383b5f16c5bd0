"""Scoring a table of scans on Spark: the saved model as an MLflow ``spark_udf``.

Rows carry paths or URIs (never the images), each worker reads its scans, writes the maps next to
where ``out_dir`` says and returns the ``scores.csv`` row (:data:`~anomaly3d_core.mlops.rows.RESPONSE_COLUMNS`).
The model is loaded once per worker process (:func:`~anomaly3d_core.mlops.pyfunc_model.load_once`)
with ``spark.task.cpus`` torch threads, so concurrent tasks do not oversubscribe the cores.

    from pyspark.sql.functions import struct
    udf = scoring_udf(spark, "models/brain")
    scored = df.withColumn("r", udf(struct("path", "out_dir"))).select("*", "r.*").drop("r")
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from anomaly3d_core.errors import Anomaly3DError, DataError
from anomaly3d_core.io.data import list_items
from anomaly3d_core.io.files import list_inputs, output_stems
from anomaly3d_core.mlops.models import is_model_uri
from anomaly3d_core.mlops.pyfunc_model import FILES_ENV, THREADS_ENV
from anomaly3d_core.mlops.rows import text
from anomaly3d_core.mlops.schema import RESPONSE_COLUMNS, path_column, request_columns
from anomaly3d_core.runner import ScoredBatch, record_rows
from anomaly3d_core.scores import FILE_COLUMNS, as_csv_cells

TABLE_SUFFIXES = (".csv", ".parquet")
NULLED_WHEN_FAILED = ("is_anomalous", "n_calibration", "n_lesions")
INSTALL_HINT = "pip install 'anomaly3d[spark]' (pyspark, and Java 17 or newer on the PATH or in JAVA_HOME)"


def require_pyspark() -> Any:
    """The ``pyspark`` module, or an error that says how to get it."""
    try:
        import pyspark
    except ImportError:
        raise Anomaly3DError(
            f"--engine spark needs pyspark, which is not installed: {INSTALL_HINT}"
        ) from None
    return pyspark


def spark_session(master: str = "local[*]", app_name: str = "anomaly3d-score") -> Any:
    """A SparkSession for scoring: small Arrow batches (a batch holds its rows' results in memory)."""
    require_pyspark()
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers run this interpreter and its packages
    session = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "16")
        .config("spark.python.worker.reuse", "true")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.python.daemon.module", "anomaly3d_core.mlops.spark_daemon")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    return session


def scoring_udf(spark: Any, model_uri: str, env_manager: str = "local") -> Any:
    """``mlflow.pyfunc.spark_udf`` for the saved model, returning a struct of ``RESPONSE_COLUMNS``."""
    import mlflow.pyfunc

    task_cpus = spark.sparkContext.getConf().get("spark.task.cpus", "1")
    quiet = logging.getLogger("mlflow.pyfunc")
    level = quiet.level
    if env_manager == "local":  # its advice to recreate the environment: workers run this one on purpose
        quiet.setLevel(logging.ERROR)
    try:
        return mlflow.pyfunc.spark_udf(
            spark, model_uri, env_manager=env_manager, extra_env={THREADS_ENV: task_cpus, FILES_ENV: "1"}
        )
    finally:
        quiet.setLevel(level)


def score_dataframe(spark: Any, model_uri: str, df: Any) -> Any:
    """``df`` (a ``path`` or ``volume`` column, optional ``format`` and ``out_dir``) with the result
    columns added; other columns (a subject id, say) are kept."""
    from pyspark.sql.functions import col, lit, struct

    udf = scoring_udf(spark, model_uri)
    accepted = udf.metadata.get_input_schema().input_names()  # the model's own request columns
    scans = [c for c in accepted if c not in ("format", "out_dir")]
    if "path" in df.columns and "path" not in accepted:
        per_sequence = [c for c in accepted if c.endswith("_path")]
        raise Anomaly3DError(
            f"{model_uri} reads {', '.join(map(repr, scans))}, not 'path'"
            + (
                f": a model of several sequences takes a path column per sequence ({', '.join(per_sequence)})"
                if per_sequence
                else ": it was saved before rows could name files; save it again with this version"
            )
        )
    if not any(c in df.columns for c in scans):
        raise Anomaly3DError(
            f"the table needs a column of scans ({' or '.join(map(repr, scans))}); "
            f"it has {', '.join(df.columns) or 'no columns'}"
        )
    inputs = [c for c in accepted if c in df.columns]
    if "out_dir" not in inputs:  # marks the request as a batch: errors per row, not one failed job
        df, inputs = df.withColumn("out_dir", lit(None).cast("string")), [*inputs, "out_dir"]
    kept = [c for c in df.columns if c not in RESPONSE_COLUMNS and c != "_anomaly3d"]
    scored = df.withColumn("_anomaly3d", udf(struct(*inputs)))
    failed = col("_anomaly3d.error") != ""
    return scored.select(*kept, *[_result_column(c, failed) for c in RESPONSE_COLUMNS])


def _result_column(name: str, failed: Any) -> Any:
    """A response column; a failed row's decision and counts null (MLflow's UDF casts a null boolean to
    false and a null long to an error, so the model answers false and 0, and they are nulled here)."""
    from pyspark.sql.functions import col, when

    value = col(f"_anomaly3d.{name}")
    return (when(~failed, value) if name in NULLED_WHEN_FAILED else value).alias(name)


def model_sequences(model_uri: str) -> list[str]:
    """The sequences a saved model takes (its ``<sequence>_path`` request columns); empty for one scan per row."""
    from mlflow.models import get_model_info

    names = get_model_info(model_uri).signature.inputs.input_names()
    return [n[: -len("_path")] for n in names if n.endswith("_path")]


def request_table(
    spec: str, out: Path, sequences: list[str] | None = None
) -> tuple[pd.DataFrame, list[DataError]]:
    """The rows to score and the inputs refused while listing them.

    A table (``.csv``/``.parquet`` with a ``path`` column, or ``<sequence>_path`` columns for a model
    of several sequences, optional ``subject``, ``format`` and ``out_dir``); else a file, folder or glob
    (for several sequences: a BIDS dataset, a manifest or a folder of ``<subject>_<sequence>`` files),
    each scan's maps going where ``anomaly3d score`` puts them (subjects: ``<stem>_score.nii.gz``).
    """
    sequences = sequences or []
    wanted = [path_column(s) for s in sequences] if len(sequences) > 1 else ["path"]
    if spec.lower().endswith(TABLE_SUFFIXES) and "*" not in spec:
        try:
            table = pd.read_csv(spec) if spec.lower().endswith(".csv") else pd.read_parquet(spec)
        except (OSError, ValueError) as exc:
            raise DataError(spec, f"cannot be read as a table ({type(exc).__name__}: {exc})") from None
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise DataError(
                spec,
                f"the table needs the column(s) {', '.join(map(repr, missing))}; it has "
                f"{', '.join(map(str, table.columns))}",
            )
        keep = [
            c for c in request_columns(sequences) if c in table.columns and c not in ("volume", *sequences)
        ]
        table = table[keep].astype(object)
        if "out_dir" not in table.columns:
            table["out_dir"] = str(out)
        table["out_dir"] = [text(v) or str(out) for v in table["out_dir"]]
        return table, []
    if len(sequences) > 1:
        found = list_items(spec, sequences)
        stems = output_stems(found.items)  # a name clash refuses the batch before any work
        rows = [
            {**{path_column(q): str(s.files[q]) for q in sequences}, "subject": stem, "out_dir": str(out)}
            for s, stem in zip(found.items, stems, strict=True)
        ]
        return pd.DataFrame(rows, columns=[*wanted, "subject", "out_dir"]), list(found.errors)
    paths = list_inputs(spec)
    stems = output_stems(paths)  # a name clash refuses the batch before any work, as on one machine
    return pd.DataFrame(
        {"path": [str(p) for p in paths], "out_dir": [str(out / Path(s).parent) for s in stems]}
    ), []


def score_with_spark(
    model: str, spec: str, out: Path, master: str = "local[*]", spark: Any = None
) -> ScoredBatch:
    """``anomaly3d score --engine spark``: score the scans ``spec`` names, maps and ``scores.csv`` in
    ``out``. Runs in ``spark`` or the active session, else in a new one on ``master``, stopped after."""
    with tempfile.TemporaryDirectory(prefix="anomaly3d-spark-model-") as tmp:
        uri = model if is_model_uri(model) else os.path.abspath(mlflow_folder(Path(model), Path(tmp)))
        return _score(uri, spec, out, master, spark)


def mlflow_folder(model: Path, tmp: Path) -> Path:
    """``model`` itself when it is an MLflow model folder; a plain one (``Detector.save``) wrapped as
    one in ``tmp``, since Spark's workers load the model through MLflow."""
    if (model / "MLmodel").is_file():
        return model
    if (model / "config.yaml").is_file() or (model / "ensemble.json").is_file():
        from anomaly3d_core.mlops.serving import save_pyfunc
        from anomaly3d_core.persistence import load_detector

        return save_pyfunc(load_detector(model), tmp / "model")
    raise Anomaly3DError(
        f"--model {model}: not a model folder (no MLmodel or config.yaml file); give a folder written by fit "
        "or an MLflow URI (models:/NAME@ALIAS)"
    )


def _score(uri: str, spec: str, out: Path, master: str, spark: Any) -> ScoredBatch:
    table, refused = request_table(spec, out, model_sequences(uri))
    require_pyspark()
    from pyspark.sql import SparkSession

    owned = spark is None and SparkSession.getActiveSession() is None
    session = spark or SparkSession.getActiveSession() or spark_session(master)
    try:
        records = [tuple(text(v) for v in rec) for rec in table.itertuples(index=False)]
        # one partition per core, in input order: each task loads the model (cached per worker) once
        frame = session.createDataFrame(records, ", ".join(f"{c} string" for c in table.columns))
        results = score_dataframe(session, uri, frame).toPandas()
    finally:
        if owned:
            session.stop()
    batch = ScoredBatch()
    for error in refused:  # subjects refused while grouping their files
        batch.failures.add(error)
    rows = []
    for r in results.to_dict("records"):
        if r["error"]:
            batch.failures.record(r["file"], DataError(r["file"], r["error"]))
            continue
        rows.append(csv_row(r, out))
    record_rows(out, rows)
    batch.rows = rows
    return batch


def csv_row(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """A response row as ``scores.csv`` writes it (:func:`~anomaly3d_core.scores.as_csv_cells`: the numbers
    as the row builder rounded them), with map names relative to ``out`` when they lie under it."""
    row = as_csv_cells(result)
    for key in FILE_COLUMNS:
        if not row[key]:
            continue
        rel = os.path.relpath(row[key], out) if "://" not in row[key] else ".."
        row[key] = rel if not rel.startswith("..") else row[key]
    return row
