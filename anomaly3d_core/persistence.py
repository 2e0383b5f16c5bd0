"""Building, saving and loading any detector: the one place that knows every detector kind.

It sits above :mod:`~anomaly3d_core.pipeline` and :mod:`~anomaly3d_core.ensemble`, so neither
imports the other's loading code (and nothing imports this module back).

Loading never executes anything from a model folder: configs are read with ``yaml.safe_load``,
weights with ``torch.load(weights_only=True)``, arrays with ``allow_pickle=False``, and the
folder's MLflow entry code (``MLmodel``, ``python_model``) is not imported. Only MLflow itself
(``mlflow.pyfunc.load_model``, ``mlflow models serve``) runs that code: serve trusted folders only.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from anomaly3d_core import safe_yaml
from anomaly3d_core.config import PipelineConfig, load_config
from anomaly3d_core.config_tree import name_sources
from anomaly3d_core.detector import Detector, model_files_dir
from anomaly3d_core.ensemble import ENSEMBLE_FILE, EnsembleConfig, EnsemblePipeline, build_ensemble_config
from anomaly3d_core.errors import Anomaly3DError, ConfigError, PluginError
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.provenance import LINEAGE_KEY, PLUGINS_FILE, read_lineage
from anomaly3d_core.registry import DISABLE_PLUGINS_ENV, get_registry
from anomaly3d_core.synthetic import SyntheticAnomalyDetector, SyntheticConfig, build_synthetic_config

DetectorConfig = PipelineConfig | EnsembleConfig | SyntheticConfig
#: top-level sections that make a YAML config another kind of detector than a pipeline
DETECTOR_SECTIONS = ("ensemble", "synthetic")
log = logging.getLogger(__name__)
__all__ = [
    "LINEAGE_KEY",
    "build_detector",
    "load_any_config",
    "load_detector",
    "read_lineage",
    "reference_config",
]


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content through ``yaml.safe_load`` (no ``!!python/...`` tags), errors as one line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        return safe_yaml.load_file(p)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{p}: not valid YAML ({exc.__class__.__name__}: {exc})".replace("\n", " ")
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot be read ({exc})") from None


def load_any_config(
    path: str | Path | None, overrides: Sequence[str] = (), registry: Any = None
) -> DetectorConfig:
    """A pipeline config; an ensemble config when the YAML has a top-level ``ensemble`` section, a
    synthetic-anomaly detector's with a top-level ``synthetic`` section.

    Every command reads its config here, so every one gets the same checks and one-line errors.
    """
    if path is not None:
        tree = read_yaml(path)
        kind = next((k for k in DETECTOR_SECTIONS if isinstance(tree, dict) and k in tree), None)
        if kind is not None:
            extra = set(tree) - {kind}
            if extra:
                where = "its members" if kind == "ensemble" else "the 'synthetic' section"
                raise ConfigError(
                    f"{path}: a{'n' if kind == 'ensemble' else ''} {kind} config has only the '{kind}' section; "
                    f"move {sorted(extra)} into {where}"
                )
            build = build_ensemble_config if kind == "ensemble" else build_synthetic_config
            section = tree[kind] or {}
            if kind == "ensemble":
                section = member_paths_from(Path(path).parent, section)
            try:
                return build(section, overrides, registry)
            except ConfigError as exc:
                raise ConfigError(name_sources(str(exc), path, overrides)) from None
    return load_config(path, overrides, registry)


def member_paths_from(folder: Path, section: Any) -> Any:
    """An ensemble section whose relative member paths name files next to its YAML where such a
    file exists (otherwise relative to the folder the command runs from, as before)."""
    if not isinstance(section, dict) or not isinstance(section.get("members"), list):
        return section
    members = [
        str(folder / m) if isinstance(m, str) and not Path(m).is_absolute() and (folder / m).is_file() else m
        for m in section["members"]
    ]
    return {**section, "members": members}


def reference_config(config_or_detector: Any) -> PipelineConfig:
    """The pipeline config that says how scans are read: the config itself, or an ensemble's first
    member's (members share their sequences); a detector's own config for a detector."""
    config = getattr(config_or_detector, "config", config_or_detector)
    return config.reference()


def build_detector(config: DetectorConfig, device: str | None = None, registry: Any = None) -> Detector:
    """An unfitted detector for a pipeline, ensemble or synthetic-detector config."""
    if isinstance(config, EnsembleConfig):
        return EnsemblePipeline(config, device=device, registry=registry)
    if isinstance(config, SyntheticConfig):
        return SyntheticAnomalyDetector(config, device=device, registry=registry)
    return AnomalyDetectionPipeline(config, device=device, registry=registry)


def load_detector(path: str | Path, device: str | None = None, registry: Any = None) -> Detector:
    """Load a saved pipeline, ensemble or synthetic-anomaly detector: a plain folder
    (:meth:`Detector.save`) or an MLflow model folder (``mlops.serving.save_pyfunc``, ``fit --out``)."""
    inner = model_files_dir(path)
    registry = check_plugins_installed(path, inner, registry)
    kind: type[Detector] = AnomalyDetectionPipeline
    if (inner / ENSEMBLE_FILE).is_file():
        kind = EnsemblePipeline
    elif _is_synthetic(inner / "config.yaml"):
        kind = SyntheticAnomalyDetector
    return kind.load_files(inner, device, registry)


def _is_synthetic(config_file: Path) -> bool:
    if not config_file.is_file():
        return False
    tree = read_yaml(config_file)
    return isinstance(tree, dict) and "synthetic" in tree


def _needed_plugins(inner: Path) -> list[tuple[str, str]]:
    """``(family, name)`` of the plugins named in a saved detector's config files."""
    needed = []
    for cfg in sorted(inner.glob("config.yaml")) + sorted(inner.glob("members/*/config.yaml")):
        tree = read_yaml(cfg)
        if isinstance(tree, dict) and isinstance(tree.get("synthetic"), dict):
            tree = tree["synthetic"]
            network = tree.get("network") if isinstance(tree.get("network"), dict) else {}
            if isinstance(network.get("type"), str) and ("segmenters", network["type"]) not in needed:
                needed.append(("segmenters", network["type"]))
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
        preprocessing = sections.get("data", {}).get("preprocessing")
        steps = preprocessing.get("steps") if isinstance(preprocessing, dict) else None
        for step in steps if isinstance(steps, list) else []:  # extra preprocessing steps
            name = step.get("type") if isinstance(step, dict) else None
            if isinstance(name, str) and ("steps", name) not in needed:
                needed.append(("steps", name))
    return needed


def _read_provenance(inner: Path) -> list[dict[str, Any]]:
    """The entries of a saved detector's ``plugins.json`` (none when it is missing or malformed)."""
    try:
        entries = json.loads((inner / PLUGINS_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    return [
        e
        for e in entries
        if isinstance(e, dict)
        and all(isinstance(e.get(k), str) for k in ("family", "name", "package", "version"))
    ]


def _missing_reason(entry: dict[str, Any] | None, reg: Any, path: str | Path) -> tuple[str, str]:
    """``(where it comes from and why it is not here, what to do)`` for a plugin this environment lacks."""
    if not entry:
        reqs = Path(path) / "requirements.txt"
        listed = [
            line.strip()
            for line in (reqs.read_text().splitlines() if reqs.is_file() else [])
            if line.strip() and not line.startswith(("#", "anomaly3d=="))
        ]
        source = "a plugin package" + (f" (the model lists {', '.join(listed)})" if listed else "")
        return f"{source}, which is not installed here", "install the package that provides it"
    package, version = entry["package"], entry["version"]
    pin = f"pip install '{package}=={version}'"
    state = reg.package_state(package) if hasattr(reg, "package_state") else None
    if state == "disabled":
        return (
            f"package '{package}' {version}, which is installed but turned off here",
            f"remove it from {DISABLE_PLUGINS_ENV} (or drop -p no:{package})",
        )
    if state:
        return (
            f"package '{package}' {version}, which is installed but broken here ({state})",
            f"fix it or {pin}",
        )
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed and installed != version:
        return f"package '{package}' {version}; version {installed} is installed here and lacks it", pin
    return f"package '{package}' {version}, which is not installed here", pin


def check_plugins_installed(path: str | Path, inner: Path, registry: Any = None) -> Any:
    """Refuse, with what to install, a model that needs a plugin this environment lacks.

    Returns the registry to load the model with: ``registry`` itself, or, where a name the model
    uses is now registered by several packages, a view that picks the package the model was saved
    with (``plugins.json``), so a newly installed clashing package does not break the model.
    """
    reg = registry or get_registry()
    provenance = {(e["family"], e["name"]): e for e in _read_provenance(inner)}
    preferred: dict[tuple[str, str], str] = {}
    for family, name in _needed_plugins(inner):
        entry = provenance.get((family, name))
        if entry and ":" not in name and name in reg.clashes(family):
            preferred[(family, name)] = entry["package"]
        try:
            reg.with_preferences(preferred).get(family, name)
        except PluginError as exc:
            if ":" not in name and name in reg.clashes(family):
                raise Anomaly3DError(f"{path}: {exc}") from None
            source, fix = _missing_reason(entry, reg, path)
            raise Anomaly3DError(
                f"{path}: this model needs the {family[:-1]} plugin '{name}' from {source}; {fix} and retry "
                "(`anomaly3d plugins` lists what is installed)"
            ) from None
    for entry in provenance.values():  # loaders that read the training scans: wanted, not required
        if entry.get("required", True) or entry["family"] != "loaders":
            continue
        try:
            reg.get("loaders", entry["name"])
        except PluginError:
            source, fix = _missing_reason(entry, reg, path)
            log.warning(
                "%s: this model was fitted on scans read by the loader plugin '%s' from %s; to read that "
                "format (%s) here: %s",
                path,
                entry["name"],
                source,
                ", ".join(entry.get("extensions") or []) or "its files",
                fix,
            )
    return reg.with_preferences(preferred) if preferred else registry
