"""Models in MLflow: logged with a run and registered under an alias, the lineage a model folder
keeps of that run, and models fetched from the tracking store by URI (``models:/NAME@ALIAS``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anomaly3d_core.mlops.tracking import (
    TAG,
    check_store,
    log_metrics,
    plugin_packages,
    plugin_versions,
    tracking_uri,
)

DEFAULT_ALIAS = "champion"


def parse_register(spec: str | None, alias: str | None = None) -> tuple[str, str] | None:
    """``NAME`` or ``NAME@ALIAS`` -> ``(name, alias)``; ``None`` for no registration."""
    from anomaly3d_core.errors import ConfigError

    if not spec:
        return None
    name, _, given = spec.partition("@")
    alias = given or alias or DEFAULT_ALIAS
    if not name.strip() or alias == "latest" or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise ConfigError(
            f"--register {spec}: give NAME or NAME@ALIAS; an alias cannot be 'latest' or a version "
            "like 'v1' (MLflow reserves them)"
        )
    return name.strip(), alias


def log_model(detector: Any, register: tuple[str, str] | None = None, tags: Mapping[str, str] = ()) -> Any:
    """Log the fitted detector as the active run's MLflow model; register it under
    ``register = (name, alias)`` and point the alias at the new version. ``None`` without a run."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    from anomaly3d_core.mlops.serving import log_pyfunc

    data = mlflow.get_run(run.info.run_id).data
    extra = {k: v for k, v in plugin_versions(detector).items() if k not in data.params}
    if extra:  # the loaders that read the training scans are known only after fitting
        mlflow.log_params(extra)
    own = {k: v for k, v in data.tags.items() if k.startswith(TAG) and not k.startswith(f"{TAG}registered")}
    tags = {**own, **dict(tags), f"{TAG}plugins": plugin_packages(detector)}
    mlflow.set_tag(f"{TAG}plugins", tags[f"{TAG}plugins"])
    label = Path(tags.get(f"{TAG}config", "model")).stem
    if tags.get(f"{TAG}dataset"):
        label += f"-{tags[f'{TAG}dataset']}"
    # one name per logged model: the config, the training data and the run that made it
    name = (re.sub(r"[^\w.-]+", "-", label).strip("-.") or "model") + f"-{run.info.run_id[:6]}"
    history = getattr(detector, "history_", None) or {}
    info = log_pyfunc(
        detector,
        name=name,
        registered_model_name=register[0] if register else None,
        tags=tags,
        model_type=f"anomaly3d-{tags.get(f'{TAG}detector', 'pipeline')}",
        step=max(len(history.get("train_loss") or []) - 1, 0),  # links the last epoch's metrics
    )
    if register and info.registered_model_version is not None:
        client = mlflow.MlflowClient()
        name, alias = register
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, alias, version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        mlflow.set_tag(f"{TAG}registered_model", f"{name}@{alias} (version {version})")
    return info


def log_fit_metrics(
    detector: Any, sets: Sequence[tuple[Any, ...]] | None, model_id: str | None = None
) -> None:
    """A fit's final figures, linked to the logged model and to the data they describe: training
    time and size to the training set, the calibrated thresholds to the scans calibrated on."""
    sets = list(sets or [])
    training = next((s[0] for s in sets if s[1] == "training"), None)
    calibration = next((s[0] for s in sets if s[1] == "validation"), training)
    log_metrics(
        {"fit_seconds": detector.fit_seconds_, "n_train_volumes": detector.n_train_volumes_},
        model_id=model_id,
        dataset=training,
    )
    log_metrics(
        {
            "threshold": detector.threshold_,
            "volume_threshold": detector.volume_threshold_,
            "n_val_volumes": detector.n_val_volumes_,
            "n_calibration": detector.postprocessor_.n_calibration,
        },
        model_id=model_id,
        dataset=calibration,
    )


def lineage(model_info: Any) -> dict[str, str]:
    """What a saved model folder keeps of the run that logged the same model (MLmodel metadata)."""
    import mlflow

    store = mlflow.get_tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_absolute():
        store = "sqlite:///" + str(Path(store.removeprefix("sqlite:///")).resolve())
    out = {
        "run_id": model_info.run_id,
        "model_id": model_info.model_id,
        "model_uri": f"models:/{model_info.model_id}",
        "tracking_uri": store,
    }
    run = mlflow.active_run()
    if run is not None:
        tags = mlflow.get_run(run.info.run_id).data.tags
        out["run_name"] = tags.get("mlflow.runName", "")
        out["config"] = tags.get(f"{TAG}config", "")
    if model_info.registered_model_version is not None:
        out["registered_version"] = str(model_info.registered_model_version)
    return {k: v for k, v in out.items() if v}


def source_run(found: dict[str, str], config: Any) -> dict[str, str]:
    """``found`` (see :func:`read_lineage`) with the config and run name of the run that logged
    the model, looked up in ``config``'s tracking store when the model folder does not say them."""
    import mlflow

    if found.get("run_id") and not found.get("config"):
        check_store(tracking_uri(config))
        mlflow.set_tracking_uri(tracking_uri(config))
        try:
            tags = mlflow.get_run(found["run_id"]).data.tags
        except Exception:  # a run of another tracking store
            return found
        found = {**found, "config": tags.get(f"{TAG}config", ""), "run_name": tags.get("mlflow.runName", "")}
    return {k: v for k, v in found.items() if v}


def link_model(source: str, found: Mapping[str, str]) -> str | None:
    """Mark the active run as using the model ``source`` (a folder or a ``models:/`` URI): tags
    ``anomaly3d.model*`` and, when that model is in this tracking store, a model input. Returns
    its logged-model id when it is, so metrics can be logged against it."""
    import mlflow
    from mlflow.entities import LoggedModelInput

    if mlflow.active_run() is None:
        return None
    is_uri = "://" in source or source.startswith(("models:/", "runs:/"))
    tags = {f"{TAG}model": source if is_uri else str(Path(source).resolve())}
    tags.update({f"{TAG}model.{k}": v for k, v in found.items() if k in ("run_id", "model_id", "run_name")})
    mlflow.set_tags(tags)
    model_id = found.get("model_id")
    if not model_id:
        return None
    try:
        mlflow.get_logged_model(model_id)
    except Exception:  # logged to another tracking store: the tags still say where it came from
        return None
    mlflow.log_input(model=LoggedModelInput(model_id))
    return model_id


def is_model_uri(spec: str) -> bool:
    """Whether ``--model`` names an MLflow model (``models:/NAME@ALIAS``, ``models:/m-...``, ``runs:/...``)."""
    return spec.startswith(("models:/", "runs:/")) or "://" in spec


def fetch_model(uri: str, stack: contextlib.ExitStack) -> Path:
    """Download the MLflow model ``uri`` from the tracking store (``MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlruns.db``) into a folder that lives as long as ``stack``."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from anomaly3d_core.errors import Anomaly3DError

    store = tracking_uri()
    check_store(store)
    mlflow.set_tracking_uri(store)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="anomaly3d-model-")))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder)))
    except (MlflowException, OSError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise Anomaly3DError(
            f"--model {uri}: cannot be fetched from the tracking store {store} ({reason}); "
            "set MLFLOW_TRACKING_URI to the store that holds it"
        ) from None
    if not (local / "MLmodel").is_file():
        raise Anomaly3DError(f"--model {uri}: not an MLflow model (no MLmodel file)")
    return local
