"""Optuna tuning: search space from the YAML, TPE + median pruning, nested MLflow runs.

Several ``anomaly3d tune`` workers on different machines share one study through an RDB storage
URL; trial numbers are handed out by the storage, and a worker whose trial number reaches
``n_trials`` stops, so the study ends with exactly ``n_trials`` finished trials.

Each trial's model goes to ``OUT/trials/<study>/NNNN``. The study's best (``best_config.yaml``,
``best_model``, ``best.json``) is written once, atomically, by the worker that finishes last
(no trial of the study still running), or on demand with ``--write-best``.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import optuna
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly3d_core.config import PipelineConfig, apply_overrides, build_config
from anomaly3d_core.demo.synthetic import inject_anomalies
from anomaly3d_core.detector import Detector
from anomaly3d_core.engine import Engine
from anomaly3d_core.errors import ConfigError, DataError, did_you_mean
from anomaly3d_core.evaluator import find_mask
from anomaly3d_core.io.data import list_items
from anomaly3d_core.io.files import atomic_write, load_volume, replace_tree, write_lock
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.mlops.models import log_model, parse_register
from anomaly3d_core.mlops.naming import data_folder, set_name
from anomaly3d_core.mlops.tracker import mlflow_model_writer, tracker_for
from anomaly3d_core.mlops.tracking import (
    METRIC_ALIASES,
    command_run,
    config_label,
    log_datasets,
    log_metrics,
    run_tags,
)
from anomaly3d_core.pipeline import AnomalyDetectionPipeline

log = logging.getLogger(__name__)
OBJECTIVES = ("pixel_ap", "pixel_auc", *METRIC_ALIASES)  # voxel_ap / voxel_auroc: the older names


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Categorical(_Param):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


class FloatRange(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class IntRange(_Param):
    type: Literal["int"]
    low: int
    high: int
    step: int = 1
    log: bool = False


SearchParam = Annotated[Categorical | FloatRange | IntRange, Field(discriminator="type")]
_SPACE = TypeAdapter(dict[str, SearchParam])


def parse_search_space(config: PipelineConfig) -> dict[str, Categorical | FloatRange | IntRange]:
    """Validate ``tuning.search_space``: parameter specs and that every key is a real config key."""
    try:
        space = _SPACE.validate_python(config.tuning.search_space)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if p not in ("categorical", "float", "int"))
        raise ConfigError(f"tuning.search_space.{loc}: {first['msg']}") from None
    if not space:
        raise ConfigError(
            "tuning.search_space is empty; add e.g. 'training.learning_rate: {type: float, low: 1e-4, high: 1e-2, log: true}'"
        )
    base = config.model_dump(mode="json")
    for key, spec in space.items():
        if isinstance(spec, FloatRange | IntRange) and spec.low >= spec.high:
            raise ConfigError(f"tuning.search_space.{key}: low ({spec.low}) must be below high ({spec.high})")
        sample = spec.choices[0] if isinstance(spec, Categorical) else spec.low
        try:  # an unknown key or a bad value fails here, with its dotted path
            build_config(apply_overrides(copy.deepcopy(base), [f"{key}={json.dumps(sample)}"]))
        except ConfigError as exc:
            raise ConfigError(f"tuning.search_space.{key}: {exc}") from None
    return space


def suggest(trial: optuna.Trial, space: Mapping[str, Any]) -> list[str]:
    """Overrides ``key=value`` for one trial."""
    out = []
    for key, spec in space.items():
        if isinstance(spec, Categorical):
            # Optuna stores categoricals as JSON-able scalars; lists go through their JSON text
            choices = [json.dumps(c) if isinstance(c, list | dict) else c for c in spec.choices]
            value = trial.suggest_categorical(key, choices)
            value = json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value
        elif isinstance(spec, FloatRange):
            value = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        else:
            value = trial.suggest_int(key, spec.low, spec.high, step=spec.step, log=spec.log)
        out.append(f"{key}={json.dumps(value)}")
    return out


def make_storage(url: str | None) -> Any:
    """``None`` -> in memory; ``*.log``/``*.journal`` -> a journal file; else an RDB URL (sqlite, postgresql, mysql)."""
    if url is None:
        return None
    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url))
    # Workers started together may race to create the schema; the loser retries and finds it made.
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception:  # sqlalchemy IntegrityError/OperationalError from the race
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


class ValidationSet:
    """Held-out scans with masks: labelled ones, or normal ones with injected anomalies."""

    def __init__(self, volumes: list[Any], masks: list[np.ndarray], source: str) -> None:
        self.volumes, self.masks, self.source = volumes, masks, source

    @classmethod
    def build(
        cls,
        normals: Sequence[Any],
        val: Sequence[Any] | None,
        val_masks: Path | None,
        seed: int,
        read: Any = load_volume,
    ) -> ValidationSet:
        """``read`` turns an input (a file or a subject) into a volume, as the tuned pipeline reads it."""

        if val:
            if val_masks is None:
                raise ConfigError(
                    "--val needs --val-masks (a folder of ground-truth masks with the same file names)"
                )
            vols = [read(p) for p in val]
            masks = [
                load_volume(
                    find_mask(Path(str(v.path)), val_masks, stem=str(p) if isinstance(p, Subject) else None),
                    allow_constant=True,
                ).array
                > 0
                for p, v in zip(val, vols, strict=True)
            ]
            return cls(vols, masks, "labelled")
        rng = np.random.default_rng(seed)
        pairs = [inject_anomalies(read(p), rng) for p in normals]
        return cls([v for v, _ in pairs], [m for _, m in pairs], "synthetic")

    def metrics(self, detector: Detector) -> dict[str, float]:
        """Pooled voxel AP and AUROC inside each scan's foreground (works mid-training: no threshold
        needed), named as ``evaluate`` names them."""
        truths, scores = [], []
        for vol, mask in zip(self.volumes, self.masks, strict=True):
            r = detector.score_native(vol)
            truths.append(mask[r.foreground])
            scores.append(r.score_map[r.foreground])
        y, s = np.concatenate(truths), np.concatenate(scores)
        return {"pixel_ap": float(average_precision_score(y, s)), "pixel_auc": float(roc_auc_score(y, s))}


def trials_dir(out: Path, study_name: str) -> Path:
    """Where a study's trial models go: keyed by study, so studies sharing ``--out`` never collide."""
    safe = re.sub(r"[^\w.-]+", "_", study_name).strip("._") or "study"
    return out / "trials" / safe


@dataclass
class TuneRequest:
    """What one ``anomaly3d tune`` worker does: the scans, the study and where the best goes."""

    train: str | None = None
    val: str | None = None
    val_masks: str | None = None
    out: str = "tuning_output"
    study_name: str = "anomaly3d"
    storage: str | None = None
    n_trials: int | None = None
    timeout: float | None = None
    write_best: bool = False
    register: str | None = None
    config: str | None = None  # the config file's path, for run names


def run_tuning(config: PipelineConfig, args: TuneRequest) -> int:
    """The ``anomaly3d tune`` command: one worker of the study ``args.study_name``."""

    space = parse_search_space(config)
    if config.tuning.metric not in OBJECTIVES:
        raise ConfigError("tuning.metric: " + did_you_mean(config.tuning.metric, OBJECTIVES, "metric"))
    metric = METRIC_ALIASES.get(config.tuning.metric, config.tuning.metric)
    register = (
        parse_register(args.register or config.tracking.register_as or f"anomaly3d-{args.study_name}")
        if config.tracking.enabled
        else None
    )
    config_name = config_label(args.config)
    command = f"tune-{args.study_name}"
    study_tags = {"optuna.study": args.study_name, "anomaly3d.command": "tune"}
    n_trials = args.n_trials or config.tuning.n_trials
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=args.study_name,
        storage=make_storage(args.storage),
        load_if_exists=True,
        direction=config.tuning.direction,
        sampler=optuna.samplers.TPESampler(seed=None),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
    )
    base = config.model_dump(mode="json")
    if args.write_best:
        with command_run(config, f"{command}-best", config_name, tags=study_tags):
            best = write_best(study, base, config, args.study_name, out, metric, register)
        print(
            f"best of study '{args.study_name}': #{best.number}, {metric} = {best.value:.4f}; written to {out}"
        )
        return 0
    if not args.train:
        raise ConfigError("tune needs --train (a folder, file or glob of normal scans), or --write-best")
    channels = config.data.channels
    found = list_items(args.train, channels)
    inputs = found.items
    if len(inputs) < 3:
        raise DataError(
            args.train, f"{len(inputs)} scan(s); tuning needs at least 3 normal scans (train + held-out)"
        )
    n_hold = 0 if args.val else max(1, int(round(len(inputs) * 0.25)))
    train, held = inputs[n_hold:], inputs[:n_hold]
    val = ValidationSet.build(
        held,
        list_items(args.val, channels).items if args.val else None,
        Path(args.val_masks) if args.val_masks else None,
        config.training.seed,
        AnomalyDetectionPipeline(config).read_aligned,
    )
    trials = trials_dir(out, args.study_name)
    name = set_name(data_folder(args.train))
    sets: list[tuple[Any, ...]] = []
    if config.tracking.enabled:
        from anomaly3d_core.mlops.datasets import ScanSet

        sets = [(ScanSet(train, name=name), "training")]
        held_set = (
            ScanSet(list_items(args.val, channels).items, masks=args.val_masks)
            if args.val
            else ScanSet(held, name=name)
        )
        sets.append((held_set, "validation", {"anomalies": val.source}))

    def build(overrides: list[str]) -> AnomalyDetectionPipeline:
        return AnomalyDetectionPipeline(build_config(apply_overrides(copy.deepcopy(base), overrides)))

    with command_run(config, command, config_name, name, tags=study_tags):
        log_datasets(sets)
        Engine(tracker_for(config), mlflow_model_writer).tune(
            OptunaStudy(study, space, n_trials),
            build,
            train,
            val.metrics,
            trials,
            metric=metric,
            n_trials=n_trials,
            report_every=config.tuning.report_every,
            timeout=args.timeout,
            tags=lambda cfg: {**run_tags(cfg, "tune", config_name, name), **study_tags},
            datasets=sets,
        )
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not finished:
            raise ConfigError(
                "no tuning trial finished (all pruned or failed); widen the search space or raise --n-trials"
            )
        last = finishes_last(study)
        best = study.best_trial
        if last:  # no trial of the study runs elsewhere: this worker writes the study's best
            best = write_best(study, base, config, args.study_name, out, metric, register)
    print(
        f"{len(finished)} trial(s) finished in study '{args.study_name}'; best #{best.number}: {metric} = {best.value:.4f}"
    )
    if not last:
        print(
            "trials of the study are still running elsewhere; the worker that finishes last writes "
            f"{out / 'best_config.yaml'} and {out / 'best_model'} (or run again with --write-best)"
        )
    else:
        print(
            f"best config: {out / 'best_config.yaml'}; best model: {out / 'best_model'} (validation: {val.source} anomalies)"
        )
    return 0


class OptunaStudy:
    """An Optuna study as :meth:`Engine.tune <anomaly3d_core.engine.Engine.tune>` drives it: TPE
    suggestions from the search space, median pruning, and at most ``n_trials`` trials in the study
    however many workers share it."""

    def __init__(self, study: optuna.Study, space: Mapping[str, Any], n_trials: int) -> None:
        self.study, self.space, self.n_trials = study, space, n_trials

    def optimize(self, objective: Any, n_trials: int, timeout: float | None) -> None:
        self.study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(DataError,))

    def suggest(self, trial: optuna.Trial) -> tuple[int, list[str]]:
        if trial.number >= self.n_trials:  # other workers ran the study's trials already
            trial.set_user_attr("overflow", True)
            trial.study.stop()
            raise optuna.TrialPruned("study already has the requested number of trials")
        return trial.number, suggest(trial, self.space)

    def report(self, trial: optuna.Trial, value: float, step: int) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {step + 1}")


def finishes_last(study: optuna.Study) -> bool:
    """True when no trial of the study is running or waiting (this worker is the last one busy)."""
    busy = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    return not study.get_trials(deepcopy=False, states=busy)


def write_best(
    study: optuna.Study,
    base: dict[str, Any],
    config: PipelineConfig,
    study_name: str,
    out: Path,
    metric: str,
    register: tuple[str, str] | None = None,
) -> optuna.trial.FrozenTrial:
    """Write the study's best config and model into ``out``, atomically, once per best trial; log
    the model to the active run and register it under ``register = (name, alias)``."""
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        raise ConfigError(f"study '{study_name}' has no finished trial yet; nothing to write")
    # Two workers that finish together may both be the last: the second waits for the first's write
    # (its lock on best_model would otherwise refuse it at once) and then finds it done.
    with write_lock(out / "best.json", "study's best", blocking=True):
        best = study.best_trial
        record = {"study": study_name, "trial": best.number, "value": best.value, "metric": metric}
        marker = out / "best.json"
        try:
            if json.loads(marker.read_text()) == record and (out / "best_model" / "MLmodel").is_file():
                return best  # already written for this very trial
        except (OSError, ValueError):
            pass
        best_cfg = build_config(
            apply_overrides(
                copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in _decoded(best.params).items()]
            )
        )
        atomic_write(out / "best_config.yaml", lambda tmp: Path(tmp).write_text(best_cfg.to_yaml()))
        log_metrics({metric: best.value, "best_trial": best.number})
        model_dir = trials_dir(out, study_name) / f"{best.number:04d}"
        if model_dir.is_dir():
            replace_tree(out / "best_model", lambda new: shutil.copytree(model_dir, new), "best model")
            if config.tracking.enabled:
                log_model(AnomalyDetectionPipeline.load(model_dir), register)
        atomic_write(marker, lambda tmp: Path(tmp).write_text(json.dumps(record)))
        return best


def _decoded(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v for k, v in params.items()}
