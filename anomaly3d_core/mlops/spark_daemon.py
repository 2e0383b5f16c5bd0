"""Spark's Python daemon with the scoring stack imported once: every Python worker forks from the
daemon, so torch, MLflow and the pyfunc model are imported once per executor, not once per worker.

Used by :func:`anomaly3d_core.mlops.spark.spark_session` as ``spark.python.daemon.module``.
"""

import mlflow.pyfunc  # noqa: F401
from pyspark import daemon

import anomaly3d_core.mlops.pyfunc_model  # noqa: F401

if __name__ == "__main__":
    daemon.manager()
