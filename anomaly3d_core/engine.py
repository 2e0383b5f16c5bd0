"""The engine: the flows *fit → record → save*, *score → write*, *evaluate* and *tune*, in one place.

Like anomalib's ``Engine``, a flow takes a detector, its inputs and where its outputs go, runs
them and returns what it made; the command line, the demo, tuning and the benchmark scripts call
it. Side effects come in through two injected objects:

- a :class:`~anomaly3d_core.tracking.Tracker` that records runs, parameters, metrics, artifacts,
  data sets and models (:class:`~anomaly3d_core.tracking.NullTracker`, the default, records
  nothing; ``anomaly3d_core.mlops.tracker.MLflowTracker`` records to MLflow);
- a model writer, ``writer(detector, folder, metadata) -> folder`` (default
  :meth:`Detector.save <anomaly3d_core.detector.Detector.save>`, a plain folder; the command line
  gives ``anomaly3d_core.mlops.serving.save_pyfunc``, an MLflow model folder).

The tune flow drives a search through a third, a :class:`Study` (``anomaly3d_core.mlops.tuning.OptunaStudy``
wraps Optuna), so the engine imports no search library either.

Flows started inside :meth:`Engine.run` record into that one run (``demo``: fit, score and
evaluate as one run); on their own each opens its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from anomaly3d_core.detector import Detector
from anomaly3d_core.evaluator import evaluate_files
from anomaly3d_core.io.data import BatchFailures
from anomaly3d_core.io.files import check_model_target, write_lock
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.model.training import EpochCallback
from anomaly3d_core.persistence import LINEAGE_KEY, read_lineage
from anomaly3d_core.postprocess.calibration import last_calibration_warns
from anomaly3d_core.runner import ScoredBatch, score_files
from anomaly3d_core.tracking import NullTracker, Tracker

ModelWriter = Callable[[Detector, Path, "dict[str, Any] | None"], Path]
Item = Path | Subject


def plain_writer(detector: Detector, folder: Path, metadata: dict[str, Any] | None) -> Path:
    """The default model writer: :meth:`Detector.save`, a plain model folder."""
    return detector.save(folder, metadata)


class Study(Protocol):
    """A hyper-parameter search as :meth:`Engine.tune` drives it."""

    def optimize(self, objective: Callable[[Any], float], n_trials: int, timeout: float | None) -> None:
        """Call ``objective(trial)`` for up to ``n_trials`` trials (or ``timeout`` seconds)."""

    def suggest(self, trial: Any) -> tuple[int, list[str]]:
        """The trial's number and its settings as ``--set`` overrides (``dotted.key=value``)."""

    def report(self, trial: Any, value: float, step: int) -> None:
        """An intermediate value of the trial; raises the search's own exception to stop (prune) it."""


@dataclass
class FitResult:
    """A fitted detector, the model folder written (``None`` on a non-main distributed rank) and
    what that folder keeps of the run that recorded it."""

    detector: Detector
    folder: Path | None
    lineage: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> BatchFailures:
        return self.detector.failures_


@dataclass
class Evaluation:
    """Metrics of scored scans against their masks, and the scans that failed."""

    metrics: dict[str, Any]
    failures: BatchFailures


class Engine:
    """Runs the flows with an injected tracker and model writer (see the module docstring)."""

    def __init__(self, tracker: Tracker | None = None, writer: ModelWriter | None = None) -> None:
        self.tracker: Tracker = tracker or NullTracker()
        self.writer: ModelWriter = writer or plain_writer
        self._active: list[Any] = []  # the run that flows inside `run` record into

    # ------------------------------------------------------------------ runs
    @contextlib.contextmanager
    def run(
        self,
        command: str,
        config: Any,
        label: str,
        dataset: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        """One recorded run around the flows in the block; yields the run (``None``: not recorded).

        Inside an open run this yields that run: a flow never starts a second one.
        """
        if self._active:
            yield self._active[-1]
            return
        with self.tracker.run(command, config, label, dataset, tags) as run:
            self._active.append(run)
            try:
                yield run
            finally:
                self._active.pop()

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        detector: Detector,
        train: Sequence[Item],
        val: Sequence[Item] | None = None,
        out: str | Path | None = None,
        *,
        label: str = "defaults",
        train_name: str | None = None,
        val_name: str | None = None,
        register: tuple[str, str] | None = None,
        command: str = "fit",
        before: Callable[[], None] | None = None,
        show_progress: bool | None = None,
        callbacks: Sequence[EpochCallback] = (),
        calibration: Sequence[Item] | None = None,
    ) -> FitResult:
        """Train on normal scans and calibrate, record the run (data sets, model, fit metrics,
        training curves) and write the model folder ``out`` (none when ``out`` is ``None``).

        The folder is locked from the start, so a second fit into it stops at once. Under
        ``torchrun`` the other ranks train alongside; rank 0 records and writes. ``before`` runs on
        rank 0 once the folder is locked, before training (the command line prints its advice);
        ``callbacks`` get each epoch's losses, as the tracker's own does (tuning prunes with them);
        ``calibration``: held-out normal scans that calibrate the p-values after training.
        """
        from anomaly3d_core.model import distributed

        if not distributed.is_main():
            detector.fit(train, val, show_progress=False)
            return FitResult(detector, None)
        lock = write_lock(out, "model folder") if out is not None else contextlib.nullcontext()
        with lock, self.run(command, detector.config, label, train_name) as run:
            if before is not None:
                before()
            callback = self.tracker.epoch_callback() if run is not None else None
            every = [*callbacks, callback] if callback else list(callbacks)
            with last_calibration_warns():  # a warning only for the calibration set finally used
                detector.fit(train, val, callbacks=every, show_progress=show_progress)
                if calibration:
                    detector.calibrate(calibration)
            lineage: dict[str, str] = {}
            if run is not None:
                self.tracker.log_fit_datasets(detector, train, val, train_name or "", val_name)
                lineage = self.tracker.log_model(detector, register)
                self.tracker.log_fit_metrics(detector)
            folder = None if out is None else self.save(detector, Path(out), lineage)
        return FitResult(detector, folder, lineage)

    def save(self, detector: Detector, folder: Path, lineage: Mapping[str, str] | None = None) -> Path:
        """Write the model folder (naming the run that recorded the model) and its training curves."""
        from anomaly3d_core.evaluation.plotting import plot_training_curves  # matplotlib, on demand

        written = self.writer(detector, folder, {LINEAGE_KEY: dict(lineage)} if lineage else None)
        plot_training_curves(detector.history_, written / "training_curves.png")
        self.tracker.log_artifact(written / "training_curves.png", "plots")
        return written

    @staticmethod
    def check_fit_target(out: str | Path) -> None:
        """Join a ``torchrun`` group when launched by one, and on the main rank check, before any
        work, that a model folder can be written at ``out``."""
        from anomaly3d_core.model import distributed

        distributed.init_from_env()
        if distributed.is_main():
            check_model_target(out)

    # ------------------------------------------------------------------ score
    def score(
        self,
        detector: Detector,
        inputs: Sequence[Item],
        out: str | Path,
        *,
        bids_root: Path | None = None,
        model_uri: str = "",
        keep_results: bool = False,
        log_maps: int = 0,
    ) -> ScoredBatch:
        """Score every input, write its maps and its ``scores.csv`` row into ``out`` (BIDS-Derivatives
        for subjects of ``bids_root``); bad inputs go to the batch's ``failures``. The first
        ``log_maps`` score maps are kept with the active run."""
        out = Path(out)
        batch = score_files(
            detector, list(inputs), out, keep_results=keep_results, bids_root=bids_root, model_uri=model_uri
        )
        for row in batch.rows[:log_maps]:
            self.tracker.log_artifact(out / row["score_map"], "score_maps")
        return batch

    # ------------------------------------------------------------------ evaluate
    def evaluate(
        self,
        detector: Detector,
        inputs: Sequence[Item],
        masks: str | Path,
        out: str | Path,
        *,
        label: str = "defaults",
        data_name: str | None = None,
        data_source: str | Path | None = None,
        model: str | None = None,
        lineage: Mapping[str, str] | None = None,
        model_uri: str = "",
    ) -> Evaluation:
        """Score ``inputs``, compare with the ground truth in ``masks``, write ``metrics.json``,
        ``summary.txt`` and plots into ``out``, and record them (with the evaluation data set and,
        for a saved model ``model``, a link to it and its thresholds); reports name the model by
        ``model_uri`` (default ``model``)."""
        masks, out = Path(masks), Path(out)
        with self.run("evaluate", detector.config, label, data_name) as run:
            model_id = self.tracker.link_model(model, lineage or {}) if run is not None and model else None
            uri = model_uri or model or ""
            metrics, failures = evaluate_files(detector, list(inputs), masks, out, model_uri=uri)
            dataset = None
            if run is not None:
                dataset = self.tracker.log_evaluation_dataset(
                    inputs, [path for path, _ in failures.items], masks, data_name or "", data_source or masks
                )
            recorded = {**metrics, **model_metrics(detector)} if model else metrics
            self.tracker.log_metrics(recorded, model_id=model_id, dataset=dataset)
            self.tracker.log_artifact(out, "evaluation")
        return Evaluation(metrics, failures)

    # ------------------------------------------------------------------ tune
    def tune(
        self,
        study: Study,
        build: Callable[[list[str]], Detector],
        train: Sequence[Item],
        validate: Callable[[Detector], dict[str, float]],
        out: str | Path,
        *,
        metric: str,
        n_trials: int,
        report_every: int = 5,
        timeout: float | None = None,
        tags: Callable[[Any], Mapping[str, str]] | None = None,
        datasets: Sequence[Any] = (),
    ) -> dict[int, float]:
        """Run trials of ``study``: each builds a detector from its suggested overrides (``build``), fits
        it on ``train`` into ``out/NNNN`` (written by this engine's writer, recorded in its own trial run
        with ``tags(config)`` and ``datasets``), reports ``validate(detector)[metric]`` every
        ``report_every`` epochs (the study may stop the trial there) and returns that metric at the end.
        Returns the value of each trial this call finished, by trial number."""
        out, values = Path(out), {}
        quiet = Engine(
            writer=self.writer
        )  # the trial's run is the tracker's trial run: fit records nothing itself

        def objective(trial: Any) -> float:
            number, overrides = study.suggest(trial)
            detector = build(overrides)
            labels = {**(tags(detector.config) if tags else {}), "optuna.trial": str(number)}
            with self.tracker.trial(number, detector.config, labels, datasets):

                def report(epoch: int, losses: dict[str, float]) -> None:
                    if (epoch + 1) % report_every:
                        return
                    value = validate(detector)[metric]
                    self.tracker.log_metrics(
                        {"val_loss": losses["val_loss"], f"val_{metric}": value}, step=epoch
                    )
                    study.report(trial, value, epoch)

                quiet.fit(detector, train, out=out / f"{number:04d}", callbacks=[report])
                scores = validate(detector)
                self.tracker.log_metrics(
                    {**scores, "fit_seconds": detector.fit_seconds_, **model_metrics(detector)}
                )
            values[number] = scores[metric]
            return scores[metric]

        study.optimize(objective, n_trials, timeout)
        return values

    def model_lineage(self, folder: str | Path, config: Any) -> dict[str, str]:
        """The run and logged model behind a model folder, completed from the tracking store."""
        return self.tracker.model_source(read_lineage(folder), config)


def model_metrics(detector: Detector) -> dict[str, float]:
    """The fitted detector's calibrated thresholds, named as every run names them."""
    return {"threshold": detector.threshold_, "volume_threshold": detector.volume_threshold_}
