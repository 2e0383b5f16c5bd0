"""Building, saving and loading any detector: the one place that knows every detector kind.

It sits above :mod:`~anomaly3d_core.pipeline` and :mod:`~anomaly3d_core.ensemble`, so neither
imports the other's loading code (and nothing imports this module back).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from anomaly3d_core.config import PipelineConfig, load_config
from anomaly3d_core.detector import Detector, model_files_dir
from anomaly3d_core.ensemble import ENSEMBLE_FILE, EnsembleConfig, EnsemblePipeline, build_ensemble_config
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.pipeline import AnomalyDetectionPipeline

DetectorConfig = PipelineConfig | EnsembleConfig


def load_any_config(
    path: str | Path | None, overrides: Sequence[str] = (), registry: Any = None
) -> DetectorConfig:
    """A pipeline config, or an ensemble config when the YAML has a top-level ``ensemble`` section."""
    if path is not None and Path(path).is_file():
        tree = yaml.safe_load(Path(path).read_text())
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
    kind = EnsemblePipeline if (inner / ENSEMBLE_FILE).is_file() else AnomalyDetectionPipeline
    return kind.load_files(inner, device, registry)
