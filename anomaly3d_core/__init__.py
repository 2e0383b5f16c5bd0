"""anomaly3d: unsupervised anomaly detection in 3D medical images.

The documented API is importable from here (``from anomaly3d_core import AnomalyDetectionPipeline``).
Names are resolved on first use, so ``import anomaly3d_core`` (and the CLI's ``--help``) stays
fast and does not import torch, MLflow or scikit-learn until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from anomaly3d_core.hookspecs import hookimpl

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # detectors and their contract
    "Detector": "anomaly3d_core.detector",
    "ScoreResult": "anomaly3d_core.detector",
    "AnomalyDetectionPipeline": "anomaly3d_core.pipeline",
    "EnsemblePipeline": "anomaly3d_core.ensemble",
    "PostProcessor": "anomaly3d_core.postprocess.postprocessor",
    "build_detector": "anomaly3d_core.persistence",
    "load_detector": "anomaly3d_core.persistence",
    "load_any_config": "anomaly3d_core.persistence",
    # the engine: fit, score and evaluate flows; what they record
    "Engine": "anomaly3d_core.engine",
    "Tracker": "anomaly3d_core.tracking",
    "NullTracker": "anomaly3d_core.tracking",
    # configuration and plugins
    "PipelineConfig": "anomaly3d_core.config",
    "load_config": "anomaly3d_core.config",
    "get_plugin_manager": "anomaly3d_core.registry",
    "get_registry": "anomaly3d_core.registry",
    # data
    "Volume": "anomaly3d_core.io.volume",
    "load_volume": "anomaly3d_core.io.files",
    "load_dataset": "anomaly3d_core.seed_api",
    "load_and_normalize_volume": "anomaly3d_core.seed_api",
    "augment_volume": "anomaly3d_core.preprocess.augmentation",
    "extract_patches_3d": "anomaly3d_core.model.patches",
    "make_demo_dataset": "anomaly3d_core.demo.datasets",
    # thresholds, evaluation, plots
    "compute_threshold_from_normal_scores": "anomaly3d_core.postprocess.thresholding",
    "apply_threshold": "anomaly3d_core.postprocess.thresholding",
    "multi_threshold_analysis": "anomaly3d_core.postprocess.thresholding",
    "comprehensive_evaluation": "anomaly3d_core.evaluation.metrics",
    "compute_optimal_threshold": "anomaly3d_core.evaluation.metrics",
    "visualize_threshold_analysis": "anomaly3d_core.evaluation.plotting",
    "plot_roc_curves": "anomaly3d_core.evaluation.plotting",
    "plot_precision_recall_curves": "anomaly3d_core.evaluation.plotting",
    # the seed README's API
    "create_simple_pipeline": "anomaly3d_core.seed_api",
    "create_resnet_pipeline": "anomaly3d_core.seed_api",
    "ensemble_inference": "anomaly3d_core.seed_api",
    "inference_pipeline": "anomaly3d_core.seed_api",
    "FeatureExtractor3D": "anomaly3d_core.seed_api",
}

__all__ = ["hookimpl", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'anomaly3d_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from anomaly3d_core.config import PipelineConfig, load_config  # noqa: F401
    from anomaly3d_core.detector import Detector, ScoreResult  # noqa: F401
    from anomaly3d_core.engine import Engine  # noqa: F401
    from anomaly3d_core.ensemble import EnsemblePipeline  # noqa: F401
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline  # noqa: F401
    from anomaly3d_core.tracking import NullTracker, Tracker  # noqa: F401
