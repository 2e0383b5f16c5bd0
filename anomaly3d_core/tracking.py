"""What the engine records about a run, as a small protocol; the default records nothing.

The engine (:mod:`anomaly3d_core.engine`) reports runs, parameters, metrics, artifacts, data sets
and models to a :class:`Tracker` it is given. :class:`NullTracker` does nothing, so the core runs
without a tracking store; :class:`anomaly3d_core.mlops.tracker.MLflowTracker` records to MLflow.
The core never imports MLflow: tracking comes in through this protocol only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from anomaly3d_core.model.training import EpochCallback


@runtime_checkable
class Tracker(Protocol):
    """Where the engine's flows report what they did (see the module docstring)."""

    def run(
        self,
        command: str,
        config: Any,
        label: str,
        dataset: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> contextlib.AbstractContextManager[Any]:
        """A run of ``command`` with ``config`` (logged as its parameters); yields the run, or
        ``None`` when nothing is recorded."""

    def trial(
        self, number: int, config: Any, tags: Mapping[str, str], datasets: Sequence[Any] = ()
    ) -> contextlib.AbstractContextManager[Any]:
        """A run nested in the active one for trial ``number`` of a search (``Engine.tune``), with
        ``config`` as its parameters and ``datasets`` (opaque to the engine) as its inputs."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters of the active run."""

    def log_metrics(
        self,
        metrics: Mapping[str, Any],
        step: int | None = None,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> None:
        """Finite numeric entries of ``metrics``, optionally linked to a model and a data set."""

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """A file or folder kept with the active run under ``folder``."""

    def epoch_callback(self) -> EpochCallback | None:
        """A training callback that records per-epoch losses, or ``None``."""

    def log_fit_datasets(
        self,
        detector: Any,
        train: Sequence[Any],
        val: Sequence[Any] | None,
        name: str,
        val_name: str | None = None,
    ) -> None:
        """The scans a fitted detector trained and calibrated on, as the run's data sets."""

    def log_evaluation_dataset(
        self, items: Sequence[Any], failed: Sequence[Any], masks: Path, name: str, source: Path
    ) -> Any:
        """The scans an evaluation used (``failed`` left out) with their masks; returns a handle
        for :meth:`log_metrics`' ``dataset``."""

    def log_model(self, detector: Any, register: tuple[str, str] | None = None) -> dict[str, str]:
        """Record the fitted detector with the active run (registered as ``(name, alias)`` when
        given); returns what a saved model folder keeps of that (its lineage), or ``{}``."""

    def log_fit_metrics(self, detector: Any) -> None:
        """A fit's final figures (time, sizes, thresholds), linked where the store can to the model
        and the data sets just recorded."""

    def model_source(self, lineage: Mapping[str, str], config: Any) -> dict[str, str]:
        """``lineage`` of a model folder completed from the store that recorded it."""

    def link_model(self, source: str, lineage: Mapping[str, str]) -> str | None:
        """Mark the active run as using the model ``source``; its id when the store knows it."""


class NullTracker:
    """A :class:`Tracker` that records nothing: the default, and what tests run with."""

    @contextlib.contextmanager
    def run(
        self,
        command: str,
        config: Any,
        label: str,
        dataset: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[None]:
        yield None

    @contextlib.contextmanager
    def trial(
        self, number: int, config: Any, tags: Mapping[str, str], datasets: Sequence[Any] = ()
    ) -> Iterator[None]:
        yield None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(
        self,
        metrics: Mapping[str, Any],
        step: int | None = None,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> None:
        return None

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        return None

    def epoch_callback(self) -> EpochCallback | None:
        return None

    def log_fit_datasets(
        self,
        detector: Any,
        train: Sequence[Any],
        val: Sequence[Any] | None,
        name: str,
        val_name: str | None = None,
    ) -> None:
        return None

    def log_evaluation_dataset(
        self, items: Sequence[Any], failed: Sequence[Any], masks: Path, name: str, source: Path
    ) -> Any:
        return None

    def log_model(self, detector: Any, register: tuple[str, str] | None = None) -> dict[str, str]:
        return {}

    def log_fit_metrics(self, detector: Any) -> None:
        return None

    def model_source(self, lineage: Mapping[str, str], config: Any) -> dict[str, str]:
        return dict(lineage)

    def link_model(self, source: str, lineage: Mapping[str, str]) -> str | None:
        return None
