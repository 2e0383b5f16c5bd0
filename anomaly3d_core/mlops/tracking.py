"""MLflow tracking: one run per command, readable names and tags, dataset inputs, metrics under one
set of names, the model logged (and registered) with every run that makes one.

The tracking URI comes from ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a
local SQLite store ``sqlite:///mlruns.db`` (artifacts in ``./mlartifacts``).

``mlflow`` (and the serving module that needs it) is imported inside the functions: runs with
tracking disabled never pay for importing it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import os
import random
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from anomaly3d_core.config import PipelineConfig
from anomaly3d_core.errors import Anomaly3DError
from anomaly3d_core.mlops.naming import common_folder
from anomaly3d_core.registry import get_registry

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
TAG = "anomaly3d."  # prefix of every tag this module sets
# Final metrics share these names whichever command logged them (fit, demo, evaluate, tune, the
# benchmark), so runs of all of them line up in the UI's comparison view.
METRIC_NAMES = {
    "pixel_ap": "pooled voxel average precision inside the foreground",
    "pixel_auc": "pooled voxel ROC AUC inside the foreground",
    "pixel_best_dice": "best Dice over all thresholds",
    "pixel_dice": "Dice at the model's threshold",
    "pixel_iou": "IoU at the model's threshold",
    "volume_auroc": "scan-level ROC AUC of the volume scores",
    "lesion_sensitivity": "share of lesions (connected components) detected",
    "fit_seconds": "training and calibration time",
    "seconds_per_volume": "scoring time per scan",
    "threshold": "the model's calibrated voxel threshold",
    "volume_threshold": "the volume score above which a scan is flagged (p <= alpha); not logged when "
    "infinite (too few calibration scans to reach alpha)",
    "n_train_volumes": "scans trained on",
    "n_val_volumes": "held-out normal scans of the fit's validation",
    "n_calibration": "normal scans the p-values were calibrated on",
}
# tuning.metric's older names for the same figures
METRIC_ALIASES = {"voxel_ap": "pixel_ap", "voxel_auroc": "pixel_auc"}


def tracking_uri(config: PipelineConfig | None = None) -> str:
    if config is not None and config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


# The experiment kind MLflow 3's UI reads to open an experiment on its runs (model training)
# rather than on the GenAI overview of traces; a kind someone set by hand is kept.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _experiment(name: str, uri: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts next to the local database, not in the cwd's default
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.resolve().parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


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


STORE_TIMEOUT_ENV = "ANOMALY3D_TRACKING_TIMEOUT"  # seconds a tracking server gets to answer the first call


def check_store(uri: str) -> None:
    """Fail at once, in one line, when a tracking server does not answer, instead of after MLflow's
    retries (minutes) or, worse, after training. Later calls get a bounded timeout and few retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    timeout = float(os.environ.get(STORE_TIMEOUT_ENV) or 10)
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        reason = (
            f"no answer within {timeout:g} s" if isinstance(exc, requests.Timeout) else type(exc).__name__
        )
        raise Anomaly3DError(
            f"tracking server {uri} does not answer ({reason}); start it, point MLFLOW_TRACKING_URI (or "
            "--set tracking.tracking_uri) at one that runs, or --set tracking.enabled=false"
        ) from None


def _experiment_id(name: str, uri: str) -> str:
    """Set the tracking URI and return the experiment's id, creating the experiment when needed."""
    import mlflow

    check_store(uri)
    mlflow.set_tracking_uri(uri)
    for attempt in range(5):  # processes sharing a new SQLite store race to create its schema
        try:
            return _experiment(name, uri)
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


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
    exp_id = _experiment_id(config.tracking.experiment_name, tracking_uri(config))
    if config.tracking.run_name and not nested:
        run_name = config.tracking.run_name
    with mlflow.start_run(
        run_name=run_name, experiment_id=exp_id, nested=nested, tags=dict(tags or {})
    ) as run:
        if log_config:
            params = {k: param_text(v) for k, v in config.flat().items()}
            params.update(plugin_versions(config))
            mlflow.log_params(params)
            mlflow.log_text(config.to_yaml(), "config.yaml")
        yield run


def param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def log_metrics(
    metrics: Mapping[str, Any],
    step: int | None = None,
    prefix: str = "",
    model_id: str | None = None,
    dataset: Any = None,
) -> None:
    """Log the finite numeric entries of ``metrics`` to the active run, if any; ``model_id`` and
    ``dataset`` link them to a logged model and the data they were measured on. Final figures
    (no ``step``) logged after the run logged its model are linked to that model."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    if model_id is None and step is None:
        outputs = getattr(run, "outputs", None)
        models = getattr(outputs, "model_outputs", None) or []
        model_id = models[-1].model_id if models else None
    clean = {
        f"{prefix}{k}": float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if clean:
        mlflow.log_metrics(clean, step=step, model_id=model_id, dataset=dataset)


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


def ui_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The UI page listing an experiment's runs. MLflow 3.5+ opens experiments in its GenAI view
    unless told ``workflowType=machine_learning`` (a switch it remembers in the browser); older 3.x
    releases read the experiment's ``mlflow.experimentKind`` tag instead."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def ui_command(config: PipelineConfig | None = None, experiment_id: str | None = None) -> str:
    """How to look at the runs: the ``mlflow ui`` command line, and the page to open when known."""
    command = f"mlflow ui --backend-store-uri {tracking_uri(config)}"
    return f"{command}  then open {ui_url(experiment_id)}" if experiment_id else command


def project_version() -> str:
    try:
        return importlib.metadata.version("anomaly3d")
    except importlib.metadata.PackageNotFoundError:
        from anomaly3d_core import __version__

        return __version__


@functools.cache
def code_revision() -> str | None:
    """The git commit of the code that runs (``+dirty`` when it has uncommitted changes), when it
    runs from a git checkout; ``None`` for an installed wheel or without git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def config_label(config_path: str | Path | None) -> str:
    """The config file's name (``brain_mri.yaml``), or ``defaults`` without one."""
    return Path(config_path).name if config_path else "defaults"


def _members(config: Any) -> list[Any]:
    return list(config.members) if config.is_ensemble else [config]


def component_tags(config: Any) -> dict[str, str]:
    """The detector kind and its component types (an ensemble joins its members' with ``+``; a
    role a member does not have, such as a synthetic detector's extractor, counts as ``-``)."""
    members = _members(config)
    parts = [m.components() for m in members]
    roles = dict.fromkeys(role for p in parts for role in p if role != "detector")

    def joined(get: Any) -> str:
        return "+".join(dict.fromkeys(get(m) for m in members))

    detector = "ensemble" if config.is_ensemble else parts[0]["detector"]
    return {
        f"{TAG}detector": detector,
        **{f"{TAG}{role}": "+".join(dict.fromkeys(p.get(role, "-") for p in parts)) for role in roles},
        f"{TAG}threshold": config.threshold.type,
        f"{TAG}normative": joined(lambda m: str(m.threshold.normative).lower()),
        f"{TAG}register_to": joined(lambda m: m.data.preprocessing.register_to),
    }


def plugin_packages(config_or_detector: Any) -> str:
    """``package==version`` of every plugin package a config or fitted detector uses, comma-separated."""
    return ", ".join(sorted(set(plugin_versions(config_or_detector).values())))


def run_tags(config: Any, command: str, config_name: str, dataset: str | None = None) -> dict[str, str]:
    """Tags that make a list of runs readable and filterable (``tags.anomaly3d.autoencoder = 'denoising'``);
    ``config`` may be ``None`` for a result that no config made (a benchmark's baseline)."""
    tags = {f"{TAG}command": command, f"{TAG}config": config_name}
    if config is not None:
        tags.update(component_tags(config))
        tags[f"{TAG}plugins"] = plugin_packages(config)
    tags[f"{TAG}version"] = project_version()
    if dataset:
        tags[f"{TAG}dataset"] = dataset
    revision = code_revision()
    if revision:
        tags[f"{TAG}code_revision"] = revision
        tags["mlflow.source.git.commit"] = revision.removesuffix("+dirty")
    return tags


def run_name(
    command: str, config_name: str, dataset: str | None = None, overrides: Sequence[str] = ()
) -> str:
    """``fit brain_mri on demo/train``: the command, the config's name and the data set's; ``--set``
    overrides follow by their last key (``, num_epochs=5``; after two, ``+N more``)."""
    name = f"{command} {config_name.removesuffix('.yaml').removesuffix('.yml')}"
    name = f"{name} on {dataset}" if dataset else name
    short = [o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.partition("=")[2] for o in overrides]
    if short:
        name += ", " + ", ".join(short[:2]) + (f" +{len(short) - 2} more" if len(short) > 2 else "")
    return name


@contextlib.contextmanager
def command_run(
    config: Any,
    command: str,
    config_name: str,
    dataset: str | None = None,
    tags: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> Iterator[Any]:
    """The run of one CLI command, named ``<command> <config> on <data set>[, overrides]`` and tagged
    by :func:`run_tags`, the ``--set`` overrides in full as tag ``anomaly3d.overrides`` and as the run's
    description (``None`` with tracking disabled)."""
    if not config.tracking.enabled:
        yield None
        return
    all_tags = {**run_tags(config, command, config_name, dataset), **dict(tags or {})}
    if overrides:
        all_tags[f"{TAG}overrides"] = " ".join(overrides)
        all_tags["mlflow.note.content"] = "--set " + " --set ".join(overrides)
    with mlflow_run(config, run_name(command, config_name, dataset, overrides), tags=all_tags) as run:
        yield run


def fit_datasets(
    detector: Any, train: Sequence[Any], val: Sequence[Any] | None, name: str, val_name: str | None = None
) -> list[tuple[Any, str]]:
    """The training and validation scan sets of a fitted detector: the scans (files or subjects) it
    trained on, skipped ones and, without ``val``, the normals it held out for calibration left
    out; and the held-out ones."""
    from anomaly3d_core.mlops.datasets import ScanSet, leave_out, pick

    failed = [path for path, _ in detector.failures_.items]
    if val:
        held = leave_out(val, failed)
    else:
        held = pick(train, [v.path for v in detector.val_volumes_ if v.path])
    used = leave_out(train, [*failed, *(k for h in held for k in _keys(h))])
    source = common_folder([f for f, _ in _scan_files(train)])
    sets = [(ScanSet(used, name=name, source=source), "training")]
    if held:
        held_source = common_folder([f for f, _ in _scan_files(val)]) if val else source
        sets.append((ScanSet(held, name=val_name or name, source=held_source), "validation"))
    return sets


def _keys(item: Any) -> set[str]:
    from anomaly3d_core.mlops.datasets import item_keys

    return item_keys(item)


def _scan_files(items: Sequence[Any]) -> list[tuple[Path, str | None]]:
    from anomaly3d_core.mlops.datasets import scan_files

    return [f for i in items for f in scan_files(i)]


def log_datasets(sets: Sequence[tuple[Any, ...]]) -> None:
    """Log each ``(ScanSet, context[, tags])`` as a dataset input of the active run (``training``,
    ``validation``, ``evaluation``), with its file list as ``datasets/<context>.json``."""
    import mlflow

    if mlflow.active_run() is None or not sets:
        return
    for dataset, context, *rest in sets:
        mlflow.log_input(dataset, context=context, tags=rest[0] if rest else None)
        mlflow.log_text(json.dumps(dataset.listing(), indent=1), f"datasets/{context}.json")
    mlflow.set_tags({f"{TAG}dataset.{s[1]}": f"{s[0].name}@{s[0].digest}" for s in sets})


def log_result_run(
    run_name: str,
    metrics: Mapping[str, Any],
    *,
    experiment: str,
    command: str = "benchmark",
    config: Any = None,
    config_name: str = "none",
    datasets: Sequence[tuple[Any, ...]] = (),
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
) -> str:
    """Record a finished result (a benchmark table row) as a run of its own, tagged, with its data
    sets and metrics named as the CLI's runs have them; returns the run id."""
    import mlflow

    exp_id = _experiment_id(experiment, uri or tracking_uri())
    training = next((d.name for d, context, *_ in datasets if context == "training"), None)
    all_tags = {**run_tags(config, command, config_name, training), **dict(tags or {})}
    evaluation = next((d for d, context, *_ in datasets if context == "evaluation"), None)
    with mlflow.start_run(run_name=run_name, experiment_id=exp_id, tags=all_tags) as run:
        if config is not None:
            mlflow.log_params(
                {**{k: param_text(v) for k, v in config.flat().items()}, **plugin_versions(config)}
            )
            mlflow.log_text(config.to_yaml(), "config.yaml")
        log_datasets(datasets)
        log_metrics(metrics, dataset=evaluation)
    return run.info.run_id
