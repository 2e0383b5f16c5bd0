"""Seed-style inference helpers on top of the scoring network and pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anomaly3d_core.interfaces import Autoencoder, FeatureExtractor
from anomaly3d_core.model.embedding import FeatureEmbedding
from anomaly3d_core.model.network import AnomalyNet
from anomaly3d_core.model.training import resolve_device


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
        if registry is None:
            from anomaly3d_core.registry import get_registry

            registry = get_registry()
        self.model: FeatureExtractor = registry.get("extractors", model_type)(args)
        if checkpoint:
            AnomalyNet.load_checkpoint(self.model, checkpoint)
        self.device = resolve_device(device)
        self.model.to(self.device).eval().requires_grad_(False)

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
    volume: Any, pipelines: Sequence[Any], combine: str = "mean"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Seed API: fitted pipelines' score maps, each as z-values against its own normal statistics, combined.

    Negative z-values (below the normal mean) count as 0; ``combine`` is ``'mean'`` or ``'max'``.
    """
    if combine not in ("mean", "max"):
        raise ValueError(f"combine must be 'mean' or 'max', got '{combine}'")
    results = [p.score(volume) for p in pipelines]
    maps = [
        np.maximum(p.normalized(r.score_map), 0.0) * r.foreground
        for p, r in zip(pipelines, results, strict=True)
    ]
    combined = np.mean(maps, axis=0) if combine == "mean" else np.max(maps, axis=0)
    return combined.astype(np.float32), {
        "members": len(pipelines),
        "combine": combine,
        "member_volume_scores": [r.volume_score for r in results],
    }
