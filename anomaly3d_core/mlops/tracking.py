"""MLflow tracking: one run per command, consistent metric names, artifacts and the model.

The tracking URI comes from ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a
local SQLite store ``sqlite:///mlruns.db`` (artifacts in ``./mlartifacts``).

``mlflow`` (and the serving module that needs it) is imported inside the functions: runs with
tracking disabled never pay for importing it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from anomaly3d_core.config import PipelineConfig
from anomaly3d_core.registry import get_registry

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def tracking_uri(config: PipelineConfig | None = None) -> str:
    if config is not None and config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _experiment(name: str, uri: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts next to the local database, not in the cwd's default
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.resolve().parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def plugin_versions(config: Any, registry: Any = None) -> dict[str, str]:
    """``plugin.<family>.<name>`` -> ``package==version`` for every plugin a config or a fitted
    detector uses (a detector adds the loaders that read its training scans).

    A name chosen as ``package:name`` gets the key ``plugin.<family>.<package>.<name>``.
    """
    reg = registry or getattr(config, "registry", None) or get_registry()
    out = {}
    for family, name in sorted(set(config.plugin_specs())):
        info = reg.info(family, name)
        key = f"plugin.{family}.{info.package}.{info.name}" if ":" in name else f"plugin.{family}.{info.name}"
        out[key] = f"{info.package}=={info.version}"
    return out


@contextlib.contextmanager
def mlflow_run(
    config: Any,
    run_name: str,
    *,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    log_config: bool = True,
) -> Iterator[Any]:
    """Start a run in the configured experiment (or do nothing when tracking is disabled)."""
    if not config.tracking.enabled:
        yield None
        return
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    for attempt in range(5):  # processes sharing a new SQLite store race to create its schema
        try:
            exp_id = _experiment(config.tracking.experiment_name, uri)
            break
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    with mlflow.start_run(
        run_name=run_name, experiment_id=exp_id, nested=nested, tags=dict(tags or {})
    ) as run:
        if log_config:
            params = {k: _param(v) for k, v in config.flat().items()}
            params.update(plugin_versions(config))
            mlflow.log_params(params)
            mlflow.log_text(config.to_yaml(), "config.yaml")
        yield run


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log the finite numeric entries of ``metrics`` to the active run, if any."""
    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def epoch_logger(prefix: str = "") -> Any:
    """Training callback that logs ``train_loss``, ``val_loss`` and ``lr`` per epoch."""

    def callback(epoch: int, values: dict[str, float]) -> None:
        log_metrics(values, step=epoch, prefix=prefix)

    return callback


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None and Path(path).exists():
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path)


def ui_command(config: PipelineConfig | None = None) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri(config)}"


def log_pyfunc_if_active(pipeline: Any, registered_model_name: str | None = None) -> Any:
    """Log the fitted pipeline as the run's MLflow model (no-op without an active run)."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    from anomaly3d_core.mlops.serving import log_pyfunc

    logged = mlflow.get_run(run.info.run_id).data.params
    extra = {k: v for k, v in plugin_versions(pipeline).items() if k not in logged}
    if extra:  # the loaders that read the training scans are known only after fitting
        mlflow.log_params(extra)
    return log_pyfunc(pipeline, registered_model_name)
