"""The seed README's API, kept for compatibility: factories, the standalone extractor, inference helpers.

New code uses :class:`~anomaly3d_core.pipeline.AnomalyDetectionPipeline` and
:class:`~anomaly3d_core.ensemble.EnsemblePipeline` directly; everything here is a thin layer on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly3d_core.config import PreprocessingConfig, merge_trees
from anomaly3d_core.detector import Detector
from anomaly3d_core.ensemble import combine_members
from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import Autoencoder, FeatureExtractor
from anomaly3d_core.io.data import BatchFailures, VolumeLike, as_volume
from anomaly3d_core.io.files import load_volume
from anomaly3d_core.model.embedding import FeatureEmbedding
from anomaly3d_core.model.network import AnomalyNet
from anomaly3d_core.model.training import resolve_device
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.preprocess.augmentation import augment_volume
from anomaly3d_core.preprocess.preprocessing import Preprocessor
from anomaly3d_core.registry import get_registry


class FeatureExtractor3D:
    """Seed API: a registered extractor by name, e.g. ``FeatureExtractor3D('resnet18')``."""

    def __init__(
        self,
        model_type: str = "simple",
        device: str | None = None,
        checkpoint: str | None = None,
        registry: Any = None,
        **args: Any,
    ) -> None:
        registry = registry or get_registry()
        self.model: FeatureExtractor = registry.get("extractors", model_type)(args)
        if checkpoint:
            AnomalyNet.load_checkpoint(self.model, checkpoint)
        self.device = resolve_device(device)
        self.model.freeze().to(self.device)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.model.layers)

    @torch.no_grad()
    def extract_features(
        self, volume: np.ndarray | torch.Tensor, layers: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Feature maps ``(C, d, h, w)`` of the requested layers for one 3D volume."""
        chosen = AnomalyNet.check_layers(self.model, list(layers) if layers else None)
        x = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None].to(self.device)
        return {name: fmap[0].cpu().numpy() for name, fmap in self.model(x, chosen).items()}


def inference_pipeline(
    volume: np.ndarray,
    feature_extractor: FeatureExtractor3D | FeatureExtractor,
    embedding: FeatureEmbedding,
    autoencoder: Autoencoder,
    layer_names: Sequence[str] | None = None,
    patch_size: tuple[int, int, int] = (8, 8, 8),
    stride: tuple[int, int, int] = (4, 4, 4),
    device: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Seed API: dense score map of a preprocessed ``volume`` from separately built parts.

    The embedding must have been fitted (``embedding.fit``) and the autoencoder trained on its output.
    """
    extractor = (
        feature_extractor.model if isinstance(feature_extractor, FeatureExtractor3D) else feature_extractor
    )
    layers = AnomalyNet.check_layers(extractor, list(layer_names) if layer_names else None)
    net = AnomalyNet(extractor, layers, embedding, autoencoder, patch_size, stride)
    dev = resolve_device(device)
    net.to(dev).eval()
    scores = net.score_map(np.asarray(volume, dtype=np.float32), dev)
    return scores, {
        "layers": layers,
        "feature_stride": net.feature_stride,
        "patch_size": patch_size,
        "stride": stride,
        "score_mode": "voxel" if net.voxel_residuals else "patch",
    }


def ensemble_inference(
    volume: VolumeLike, pipelines: Sequence[Detector], combine: str = "mean"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fitted detectors' scores combined on the input's grid with the ensemble formula.

    Each member's scores become z-values against its own normal statistics (negative values
    count as 0) and are combined with ``'mean'`` or ``'max'``, exactly as
    :class:`~anomaly3d_core.ensemble.EnsemblePipeline` does.
    """
    if combine not in ("mean", "max"):
        raise ValueError(f"combine must be 'mean' or 'max', got '{combine}'")
    combined, fg = combine_members(as_volume(volume), pipelines, combine)
    return combined, {"members": len(pipelines), "combine": combine}


def create_simple_pipeline(
    patch_size: tuple[int, int, int] = (8, 8, 8),
    hidden_dims: Sequence[int] = (128, 64),
    latent_dim: int = 32,
    autoencoder_type: str = "standard",
    **config: Any,
) -> AnomalyDetectionPipeline:
    """Seed API: raw-intensity patches (``identity`` extractor, ``flatten``) into an autoencoder."""
    tree = merge_trees(
        {
            "patches": {"patch_size": list(patch_size), "stride": [max(1, s // 2) for s in patch_size]},
            "extractor": {"type": "identity"},
            "embedding": {"embedding_method": "flatten"},
            "autoencoder": {
                "type": autoencoder_type,
                "args": {"hidden_dims": list(hidden_dims), "latent_dim": latent_dim},
            },
        },
        config,
    )
    return AnomalyDetectionPipeline(tree)


def create_resnet_pipeline(
    patch_size: tuple[int, int, int] = (8, 8, 8),
    autoencoder_type: str = "standard",
    model_type: str = "resnet18",
    layers: Sequence[str] = ("layer1", "layer2"),
    **config: Any,
) -> AnomalyDetectionPipeline:
    """Seed API: 3D ResNet features, pooled per patch, into an autoencoder."""
    tree = merge_trees(
        {
            "patches": {"patch_size": list(patch_size), "stride": [max(1, s // 2) for s in patch_size]},
            "extractor": {"type": model_type, "layers": list(layers)},
            "embedding": {"embedding_method": "avg"},
            "autoencoder": {"type": autoencoder_type},
        },
        config,
    )
    return AnomalyDetectionPipeline(tree)


def load_and_normalize_volume(
    path: str | Path,
    target_shape: tuple[int, int, int] | None = None,
    normalize_method: str = "z_score",
    clip_percentile: tuple[float, float] | None = (1.0, 99.0),
    target_spacing: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Seed API: read a scan, reorient to RAS+, resize and normalise it; returns the array."""
    volume = load_volume(path)
    config = PreprocessingConfig(
        target_shape=target_shape,
        target_spacing=target_spacing,
        normalize_method=normalize_method,  # type: ignore[arg-type]
        clip_percentile=clip_percentile,
        crop_foreground=False,
        pad_multiple=1,
        foreground="nonzero",
    )
    if normalize_method == "none" or _looks_like_mask(volume.array):
        config = config.model_copy(
            update={"normalize_method": "none", "clip_percentile": None, "foreground": "none"}
        )
    return Preprocessor(config)(volume).array


def _looks_like_mask(array: np.ndarray) -> bool:
    values = np.unique(array)
    return values.size <= 2 and set(values.tolist()) <= {0.0, 1.0}


def load_dataset(
    volume_paths: Sequence[str | Path],
    target_shape: tuple[int, int, int] | None = None,
    normalize_method: str = "z_score",
    clip_percentile: tuple[float, float] | None = (1.0, 99.0),
    apply_augmentation: bool = False,
    seed: int = 0,
    **augmentation: Any,
) -> list[np.ndarray]:
    """Seed API: load, normalise and optionally augment several scans; bad files are skipped with a warning."""
    failures = BatchFailures()
    rng = np.random.default_rng(seed)
    out = []
    for path in volume_paths:
        try:
            array = load_and_normalize_volume(path, target_shape, normalize_method, clip_percentile)
        except DataError as exc:
            failures.add(exc)
            continue
        out.append(augment_volume(array, rng=rng, **augmentation) if apply_augmentation else array)
    if not out:
        raise DataError(
            None, f"none of the {len(volume_paths)} volumes could be loaded:\n{failures.report()}"
        )
    return out
