"""Building, saving and loading any detector: the one place that knows every detector kind.

It sits above :mod:`~anomaly3d_core.pipeline` and :mod:`~anomaly3d_core.ensemble`, so neither
imports the other's loading code (and nothing imports this module back).

Loading never executes anything from a model folder: configs are read with ``yaml.safe_load``,
weights with ``torch.load(weights_only=True)``, arrays with ``allow_pickle=False``, and the
folder's MLflow entry code (``MLmodel``, ``python_model``) is not imported. Only MLflow itself
(``mlflow.pyfunc.load_model``, ``mlflow models serve``) runs that code: serve trusted folders only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from anomaly3d_core.config import PipelineConfig, load_config
from anomaly3d_core.detector import Detector, model_files_dir
from anomaly3d_core.ensemble import ENSEMBLE_FILE, EnsembleConfig, EnsemblePipeline, build_ensemble_config
from anomaly3d_core.errors import Anomaly3DError, ConfigError, PluginError
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.registry import get_registry

DetectorConfig = PipelineConfig | EnsembleConfig
PLUGINS_FILE = "plugins.json"  # written next to the detector's files by mlops.serving


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content through ``yaml.safe_load`` (no ``!!python/...`` tags), errors as one line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{p}: not valid YAML ({exc.__class__.__name__}: {exc})".replace("\n", " ")
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot be read ({exc})") from None


def load_any_config(
    path: str | Path | None, overrides: Sequence[str] = (), registry: Any = None
) -> DetectorConfig:
    """A pipeline config, or an ensemble config when the YAML has a top-level ``ensemble`` section.

    Every command reads its config here, so every one gets the same checks and one-line errors.
    """
    if path is not None:
        tree = read_yaml(path)
        if isinstance(tree, dict) and "ensemble" in tree:
            extra = set(tree) - {"ensemble"}
            if extra:
                raise ConfigError(
                    f"{path}: an ensemble config has only the 'ensemble' section; move {sorted(extra)} into its members"
                )
            try:
                return build_ensemble_config(tree["ensemble"] or {}, overrides, registry)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    return load_config(path, overrides, registry)


def build_detector(config: DetectorConfig, device: str | None = None, registry: Any = None) -> Detector:
    """An unfitted detector for a pipeline or ensemble config."""
    if isinstance(config, EnsembleConfig):
        return EnsemblePipeline(config, device=device, registry=registry)
    return AnomalyDetectionPipeline(config, device=device, registry=registry)


def load_detector(path: str | Path, device: str | None = None, registry: Any = None) -> Detector:
    """Load a saved pipeline or ensemble (an MLflow model folder or a plain folder)."""
    inner = model_files_dir(path)
    check_plugins_installed(path, inner, registry)
    kind = EnsemblePipeline if (inner / ENSEMBLE_FILE).is_file() else AnomalyDetectionPipeline
    return kind.load_files(inner, device, registry)


def _needed_plugins(inner: Path) -> list[tuple[str, str]]:
    """``(family, name)`` of the plugins named in a saved detector's config files."""
    needed = []
    for cfg in sorted(inner.glob("config.yaml")) + sorted(inner.glob("members/*/config.yaml")):
        tree = read_yaml(cfg)
        if not isinstance(tree, dict):
            continue
        sections = {k: v if isinstance(v, dict) else {} for k, v in tree.items()}
        threshold = sections.get("threshold", {})
        volume = threshold.get("volume") if isinstance(threshold.get("volume"), dict) else {}
        method = volume.get("method") if isinstance(volume.get("method"), dict) else {}
        for family, name in (
            ("extractors", sections.get("extractor", {}).get("type")),
            ("autoencoders", sections.get("autoencoder", {}).get("type")),
            ("thresholds", threshold.get("type")),
            ("thresholds", method.get("type")),
            ("loaders", sections.get("data", {}).get("loader")),
        ):
            if isinstance(name, str) and name != "auto" and (family, name) not in needed:
                needed.append((family, name))
    return needed


def check_plugins_installed(path: str | Path, inner: Path, registry: Any = None) -> None:
    """Refuse, with what to install, a model that needs a plugin this environment lacks."""
    reg = registry or get_registry()
    provenance: dict[tuple[str, str], dict[str, str]] = {}
    if (inner / PLUGINS_FILE).is_file():
        try:
            for entry in json.loads((inner / PLUGINS_FILE).read_text()):
                provenance[(entry["family"], entry["name"])] = entry
        except (ValueError, KeyError, TypeError):
            provenance = {}
    for family, name in _needed_plugins(inner):
        try:
            reg.get(family, name)
        except PluginError:
            entry = provenance.get((family, name))
            if entry:
                source = f"package '{entry['package']}' {entry['version']}"
                fix = f"pip install '{entry['package']}=={entry['version']}'"
            else:
                reqs = Path(path) / "requirements.txt"
                listed = [
                    line.strip()
                    for line in (reqs.read_text().splitlines() if reqs.is_file() else [])
                    if line.strip() and not line.startswith(("#", "anomaly3d=="))
                ]
                source = "a plugin package" + (f" (the model lists {', '.join(listed)})" if listed else "")
                fix = "install the package that provides it"
            raise Anomaly3DError(
                f"{path}: this model needs the {family[:-1]} plugin '{name}' from {source}, which is not "
                f"installed here; {fix} and retry (`anomaly3d plugins` lists what is installed)"
            ) from None
