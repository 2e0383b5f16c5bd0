"""The MLflow :class:`~anomaly3d_core.tracking.Tracker`: what the engine reports, recorded in MLflow.

Runs, tags and names come from :mod:`.tracking`; data sets are :class:`.datasets.ScanSet`; models
are logged as pyfunc models (:mod:`.serving`). ``mlflow`` is imported inside the functions, so a
run with tracking disabled (:func:`tracker_for` then gives a ``NullTracker``) never pays for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from anomaly3d_core.engine import Engine
from anomaly3d_core.mlops import models, tracking
from anomaly3d_core.mlops.naming import data_folder
from anomaly3d_core.model.training import EpochCallback
from anomaly3d_core.tracking import NullTracker, Tracker


class MLflowTracker:
    """Records runs in the tracking store that the run's config names (``tracking.*``); a run's
    ``--set`` ``overrides`` go into its name, a tag and its description."""

    def __init__(self, overrides: Sequence[str] = ()) -> None:
        self.overrides = list(overrides)
        self._sets: list[tuple[Any, ...]] = []  # the fit's data sets and model, for its metrics
        self._model_id: str | None = None

    @contextlib.contextmanager
    def run(
        self,
        command: str,
        config: Any,
        label: str,
        dataset: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        with tracking.command_run(config, command, label, dataset, tags, overrides=self.overrides) as run:
            yield run

    @contextlib.contextmanager
    def trial(
        self, number: int, config: Any, tags: Mapping[str, str], datasets: Sequence[Any] = ()
    ) -> Iterator[Any]:
        with tracking.mlflow_run(config, f"trial-{number}", nested=True, tags=tags) as run:
            tracking.log_datasets(datasets)
            yield run

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        if mlflow.active_run() is not None and params:
            mlflow.log_params({k: tracking.param_text(v) for k, v in params.items()})

    def log_metrics(
        self,
        metrics: Mapping[str, Any],
        step: int | None = None,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> None:
        tracking.log_metrics(metrics, step=step, model_id=model_id, dataset=dataset)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        tracking.log_artifact(path, folder)

    def epoch_callback(self) -> EpochCallback | None:
        return tracking.epoch_logger()

    def log_fit_datasets(
        self,
        detector: Any,
        train: Sequence[Any],
        val: Sequence[Any] | None,
        name: str,
        val_name: str | None = None,
    ) -> None:
        self._sets = tracking.fit_datasets(detector, train, val, name, val_name)
        tracking.log_datasets(self._sets)

    def log_evaluation_dataset(
        self, items: Sequence[Any], failed: Sequence[Any], masks: Path, name: str, source: Path
    ) -> Any:
        import mlflow

        if mlflow.active_run() is None:
            return None
        from anomaly3d_core.mlops.datasets import ScanSet, leave_out

        dataset = ScanSet(leave_out(items, list(failed)), name=name, masks=masks, source=data_folder(source))
        tracking.log_datasets([(dataset, "evaluation")])
        return dataset

    def log_model(self, detector: Any, register: tuple[str, str] | None = None) -> dict[str, str]:
        info = models.log_model(detector, register)
        self._model_id = info.model_id if info is not None else None
        return models.lineage(info) if info is not None else {}

    def log_fit_metrics(self, detector: Any) -> None:
        models.log_fit_metrics(detector, self._sets, self._model_id)

    def model_source(self, lineage: Mapping[str, str], config: Any) -> dict[str, str]:
        return models.source_run(dict(lineage), config)

    def link_model(self, source: str, lineage: Mapping[str, str]) -> str | None:
        return models.link_model(source, lineage)


def mlflow_model_writer(detector: Any, folder: Path, metadata: dict[str, Any] | None) -> Path:
    """The engine's model writer for MLflow model folders (servable with ``mlflow models serve``)."""
    from anomaly3d_core.mlops.serving import save_pyfunc  # mlflow is heavy: imported on save only

    return save_pyfunc(detector, folder, metadata)


def engine_for(config: Any, overrides: Sequence[str] = ()) -> Engine:
    """The engine as the command line runs it: tracking as ``config`` says (runs named with their
    ``--set`` ``overrides``), MLflow model folders."""
    return Engine(tracker_for(config, overrides), mlflow_model_writer)


def tracker_for(config: Any, overrides: Sequence[str] = ()) -> Tracker:
    """An :class:`MLflowTracker` when the config's ``tracking.enabled``, else a ``NullTracker``."""
    return MLflowTracker(overrides) if config.tracking.enabled else NullTracker()
