"""``AnomalyDetectionPipeline``: fit on normal scans, then score, threshold, evaluate, save and load.

The pipeline composes the parts (preprocessing, network, training loop, thresholds); it does
not implement them. Fitted state ends in ``_`` as in scikit-learn.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from anomaly3d_core.config import PipelineConfig, build_config
from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError
from anomaly3d_core.io.data import BatchFailures, VolumeLike, as_volume
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.model.embedding import FeatureEmbedding
from anomaly3d_core.model.network import AnomalyNet, feature_units
from anomaly3d_core.model.training import EpochCallback, resolve_device, seed_everything, train_autoencoder
from anomaly3d_core.postprocess import thresholding
from anomaly3d_core.preprocess.augmentation import augment_from_config
from anomaly3d_core.preprocess.preprocessing import Prepared, Preprocessor, foreground_mask

log = logging.getLogger(__name__)
STATE_FILE, WEIGHTS_FILE, CONFIG_FILE = "state.json", "weights.pt", "config.yaml"
NORMATIVE_FILE, EXAMPLE_FILE = "normative.npz", "example.nii.gz"


@dataclass
class ScoreResult:
    """One scored scan; ``score_map`` and ``mask`` lie on the input's own grid."""

    volume: Volume
    score_map: np.ndarray
    mask: np.ndarray
    volume_score: float
    is_anomalous: bool
    threshold: float
    prepared: Prepared | None = None
    prepared_scores: np.ndarray | None = None
    seconds: float = 0.0
    foreground: np.ndarray | None = None


def _seed_sections(
    feature_extractor_config: Mapping | None,
    embedding_config: Mapping | None,
    autoencoder_config: Mapping | None,
    patch_config: Mapping | None,
    training_config: Mapping | None,
    threshold_config: Mapping | None,
    preprocessing_config: Mapping | None,
) -> dict[str, Any]:
    """Map the seed's per-component dicts onto config sections."""
    tree: dict[str, Any] = {}
    if feature_extractor_config:
        fx = dict(feature_extractor_config)
        tree["extractor"] = {"type": fx.pop("type", "simple"), "args": fx.pop("args", {}), **fx}
    if embedding_config:
        tree["embedding"] = dict(embedding_config)
    if autoencoder_config:
        ae = dict(autoencoder_config)
        tree["autoencoder"] = {"type": ae.pop("type", "standard"), "args": ae.pop("args", {}), **ae}
    if patch_config:
        tree["patches"] = dict(patch_config)
    if training_config:
        tree["training"] = dict(training_config)
    if threshold_config:
        th = dict(threshold_config)
        tree["threshold"] = {
            "type": th.pop("type", th.pop("method", "percentile")),
            "args": th.pop("args", {}),
            **th,
        }
    if preprocessing_config:
        tree["data"] = {"preprocessing": dict(preprocessing_config)}
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "args"
            else value
        )
    return out


class Calibrated:
    """Fitted decision state shared by pipelines and ensembles (see :func:`thresholding.calibrate`)."""

    threshold_: float
    volume_threshold_: float
    score_stats_: dict[str, float]
    normal_volume_scores_: list[float]

    def _set_calibration(self, state: dict[str, Any]) -> None:
        self.threshold_, self.volume_threshold_ = state["threshold"], state["volume_threshold"]
        self.score_stats_, self.normal_volume_scores_ = state["score_stats"], state["normal_volume_scores"]

    def normalized(self, scores: np.ndarray) -> np.ndarray:
        """Scores as z-values against the normal-validation statistics (for ensembles)."""
        return (scores - self.score_stats_["mean"]) / self.score_stats_["std"]


class AnomalyDetectionPipeline(Calibrated):
    """Unsupervised voxel-wise anomaly detection for 3D scans.

    ``config`` is a :class:`PipelineConfig`, a nested dict or a YAML path; the seed's
    per-component dicts (``feature_extractor_config={'type': 'resnet18', 'args': {...}}`` and
    the others) are merged on top.
    """

    def __init__(
        self,
        config: PipelineConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        feature_extractor_config: Mapping | None = None,
        embedding_config: Mapping | None = None,
        autoencoder_config: Mapping | None = None,
        patch_config: Mapping | None = None,
        training_config: Mapping | None = None,
        threshold_config: Mapping | None = None,
        preprocessing_config: Mapping | None = None,
        device: str | None = None,
        registry: Any = None,
    ) -> None:
        if isinstance(config, str | Path):
            from anomaly3d_core.config import load_config

            config = load_config(config, registry=registry)
        tree = config.model_dump(mode="json") if isinstance(config, PipelineConfig) else dict(config or {})
        seed = _seed_sections(
            feature_extractor_config,
            embedding_config,
            autoencoder_config,
            patch_config,
            training_config,
            threshold_config,
            preprocessing_config,
        )
        self.config = build_config(_merge(tree, seed), registry=registry)
        self.registry = registry
        self.device = resolve_device(device or self.config.training.device)
        self.preprocessor = Preprocessor(self.config.data.preprocessing)

    # ---------------------------------------------------------------- building
    def _registry(self) -> Any:
        if self.registry is None:
            from anomaly3d_core.registry import get_registry

            self.registry = get_registry()
        return self.registry

    def build_network(self) -> AnomalyNet:
        """A fresh, untrained network for this config."""
        cfg, reg = self.config, self._registry()
        extractor = reg.get("extractors", cfg.extractor.type)(cfg.extractor.args)
        if cfg.extractor.checkpoint:
            AnomalyNet.load_checkpoint(extractor, cfg.extractor.checkpoint)
        layers = AnomalyNet.check_layers(extractor, cfg.extractor.layers)
        channels = sum(extractor.layer_channels[name] for name in layers)
        stride = min(extractor.layer_strides[name] for name in layers)
        embedding = FeatureEmbedding.from_config(
            cfg.embedding, channels, feature_units(cfg.patches.patch_size, stride), cfg.patches.scales
        )
        vector_dim = embedding.output_dim + (3 if cfg.embedding.positional_weight else 0)
        try:
            autoencoder = reg.get("autoencoders", cfg.autoencoder.type)(vector_dim, cfg.autoencoder.args)
        except ValueError as exc:
            raise Anomaly3DError(str(exc)) from None
        if hasattr(autoencoder, "spatial_shape"):
            autoencoder.spatial_shape = embedding.spatial_shape
        return AnomalyNet(
            extractor,
            layers,
            embedding,
            autoencoder,
            cfg.patches.patch_size,
            cfg.patches.stride,
            cfg.embedding.positional_weight,
            cfg.patches.score_mode,
        )

    def read(self, path: str | Path) -> Volume:
        """Read one scan with this pipeline's loader setting."""
        from anomaly3d_core.io.files import load_volume

        return load_volume(
            path, self.config.data.loader, self.registry, loader_args=self.config.data.loader_args
        )

    def prepare(self, item: VolumeLike, mask: np.ndarray | None = None) -> Prepared:
        """Load (if needed) and preprocess one scan."""
        volume = self.read(item) if isinstance(item, str | Path) else as_volume(item)
        return self.preprocessor(volume, mask)

    # ---------------------------------------------------------------- fitting
    def fit(
        self,
        volumes: Sequence[VolumeLike],
        val_volumes: Sequence[VolumeLike] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        show_progress: bool | None = None,
    ) -> AnomalyDetectionPipeline:
        """Train on scans of normal subjects; bad files are skipped and listed in ``failures_``."""
        cfg = self.config
        t0 = time.perf_counter()
        gen = seed_everything(cfg.training.seed)
        self.failures_ = BatchFailures()
        train = self._prepare_all(volumes)
        val = self._prepare_all(val_volumes) if val_volumes else []
        if not train:
            raise DataError(
                None,
                "no usable training volumes" + (f":\n{self.failures_.report()}" if self.failures_ else ""),
            )
        if cfg.threshold.normative:
            self._check_shared_grid(train + val)
        if not val:
            train, val = self._split(train, gen)
        if cfg.data.augmentation.enabled:
            train = train + self._augmented(train)
        self.model_ = self.build_network().to(self.device)
        if cfg.extractor.pretrain_epochs:
            from anomaly3d_core.model.pretrain import pretrain_extractor

            self.pretrain_history_ = pretrain_extractor(
                self.model_.extractor,
                self.model_.layers,
                [p.array for p in train],
                cfg.extractor.pretrain_epochs,
                crop=cfg.extractor.pretrain_crop,
                seed=cfg.training.seed,
                device=self.device,
            )
        emb = self.model_.embedding
        if emb.projection is not None:  # the MLP projection learns from a bounded sample of raw patches
            per_volume = max(1, min(cfg.patches.max_patches, 20000 // len(train)))
            emb.fit_projection(
                self._collect(train, gen, per_volume, raw=False)[0].float(), seed=cfg.training.seed
            )
        # volumes are reduced to embedding vectors one at a time, so raw patches never pile up in memory
        raw, centres = self._collect(train, gen)
        val_raw, val_centres = self._collect(val, gen)
        emb.fit_standardization(raw)
        train_vec, val_vec = self._finish(raw, centres), self._finish(val_raw, val_centres)
        t = cfg.training
        self.history_ = train_autoencoder(
            self.model_.autoencoder,
            train_vec,
            val_vec,
            num_epochs=t.num_epochs,
            learning_rate=t.learning_rate,
            batch_size=t.batch_size,
            weight_decay=t.weight_decay,
            optimizer=t.optimizer,
            scheduler_type=t.scheduler_type,
            step_size=t.step_size,
            gamma=t.gamma,
            grad_clip=t.grad_clip,
            early_stopping_patience=t.early_stopping_patience,
            use_amp=t.use_amp,
            device=self.device,
            seed=t.seed,
            checkpoint_dir=t.checkpoint_dir,
            resume=t.resume,
            callbacks=callbacks,
            show_progress=show_progress,
        )
        self.model_.eval()
        self.normative_ = self._fit_normative(train) if cfg.threshold.normative else None
        self.calibrate(val)
        self.n_train_volumes_, self.n_val_volumes_ = len(train), len(val)
        self.val_volumes_ = [p.source for p in val]
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _prepare_all(self, items: Sequence[VolumeLike] | None) -> list[Prepared]:
        out = []
        for item in items or []:
            try:
                out.append(self._prepare_cached(item))
            except DataError as exc:
                self.failures_.add(exc)
        return out

    def _prepare_cached(self, item: VolumeLike) -> Prepared:
        """:meth:`prepare`, through the on-disk cache for files (see :mod:`anomaly3d_core.io.cache`)."""
        if not self.config.data.cache or not isinstance(item, str | Path) or not Path(item).exists():
            return self.prepare(item)
        from anomaly3d_core.io import cache

        settings = {
            "loader": self.config.data.loader,
            "loader_args": self.config.data.loader_args,
            "preprocessing": self.config.data.preprocessing.model_dump(mode="json"),
        }
        key = cache.content_key(item, settings)
        prepared = cache.load(key)
        if prepared is None:
            prepared = self.prepare(item)
            cache.store(key, prepared)
        return prepared

    def _split(self, prepared: list[Prepared], gen: torch.Generator) -> tuple[list[Prepared], list[Prepared]]:
        n_val = int(round(len(prepared) * self.config.training.val_fraction))
        if len(prepared) < 3 or n_val == 0:
            log.warning(
                "only %d training volumes: calibrating thresholds on the training volumes themselves",
                len(prepared),
            )
            return prepared, prepared
        order = torch.randperm(len(prepared), generator=gen).tolist()
        return [prepared[i] for i in order[n_val:]], [prepared[i] for i in order[:n_val]]

    def _augmented(self, prepared: list[Prepared]) -> list[Prepared]:
        aug = self.config.data.augmentation
        rng = np.random.default_rng(aug.seed)
        out = []
        for prep in prepared:
            for _ in range(aug.copies):
                array = augment_from_config(prep.array, aug, rng)
                out.append(Prepared(array, prep.mask, prep.affine, prep.record, prep.source))
        return out

    def _collect(
        self, prepared: list[Prepared], gen: torch.Generator, max_patches: int | None = None, raw: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training patches of every volume and their centres; ``raw=True`` returns unstandardised embeddings."""
        p = self.config.patches
        emb = self.model_.embedding
        items, centres = [], []
        for prep in prepared:
            patches, where = self.model_.sample_patches(
                prep.array,
                prep.mask,
                max_patches or p.max_patches,
                p.min_foreground,
                p.sampling_strategy,
                gen,
                self.device,
            )
            if raw:
                with torch.no_grad():
                    patches = torch.cat(
                        [emb.raw(c.to(self.device).float()).cpu() for c in patches.split(4096)]
                    )
            items.append(patches)
            centres.append(where)
        return torch.cat(items), torch.cat(centres)

    def _finish(self, raw: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    self.model_.finish(r.to(self.device), c.to(self.device)).cpu()
                    for r, c in zip(raw.split(8192), centres.split(8192), strict=True)
                ]
            )

    # ---------------------------------------------------------------- calibration
    def calibrate(self, normal: Sequence[Prepared | VolumeLike]) -> AnomalyDetectionPipeline:
        """Fit the voxel and volume thresholds and the score statistics on held-out normal scans."""
        self._check_fitted("calibrate")
        cfg = self.config.threshold
        prepared = [n if isinstance(n, Prepared) else self.prepare(n) for n in normal]
        fitted = thresholding.calibrate(
            [self._prepared_scores(p) for p in prepared], [p.mask for p in prepared], cfg, self._registry()
        )
        self._set_calibration(fitted)
        return self

    # ---------------------------------------------------------------- scoring
    def _check_fitted(self, what: str) -> None:
        if not hasattr(self, "model_"):
            raise Anomaly3DError(
                f"pipeline is not fitted; call fit(volumes) or AnomalyDetectionPipeline.load(path) before {what}()"
            )

    def _raw_scores(self, prep: Prepared) -> np.ndarray:
        scores = self.model_.score_map(prep.array, self.device, amp=self.config.training.use_amp)
        sigma = self.config.threshold.smoothing_sigma
        return ndimage.gaussian_filter(scores, sigma) if sigma > 0 else scores

    def _prepared_scores(self, prep: Prepared) -> np.ndarray:
        scores = self._raw_scores(prep)
        normative = getattr(self, "normative_", None)
        if normative is not None:
            if scores.shape != normative["mean"].shape:
                raise DataError(
                    prep.source.path,
                    f"preprocessed grid {scores.shape} differs from the normative grid "
                    f"{normative['mean'].shape}; normative scoring needs every scan on one grid",
                )
            scores = np.maximum((scores - normative["mean"]) / normative["std"], 0.0)
        scores[~prep.mask] = 0.0
        return scores

    @staticmethod
    def _check_shared_grid(prepared: list[Prepared]) -> None:
        shapes = {p.array.shape for p in prepared}
        if len(shapes) > 1:
            raise ConfigError(
                f"threshold.normative needs every scan on one grid after preprocessing, got {len(shapes)} shapes "
                f"({', '.join(str(s) for s in sorted(shapes))}); use template-space or registered scans "
                "(data.preprocessing.register_to) with crop_foreground: false"
            )

    def _fit_normative(self, train: list[Prepared]) -> dict[str, np.ndarray]:
        """Per-voxel mean and std of the training normals' scores, smoothed (2 voxels) to steady them."""
        maps = np.stack([self._raw_scores(p) for p in train])
        mean = ndimage.gaussian_filter(maps.mean(0), 2.0)
        std = ndimage.gaussian_filter(maps.std(0), 2.0) + 0.05 * float(maps.mean())
        return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}

    def score(self, item: VolumeLike) -> ScoreResult:
        """Score one scan: score map, binary mask, volume score and decision, on the input's grid."""
        self._check_fitted("score")
        t0 = time.perf_counter()
        prep = self.prepare(item)
        scores = self._prepared_scores(prep)
        cfg = self.config.threshold
        threshold, mask, vscore = thresholding.decide(
            scores, prep.mask, prep.spacing, cfg, self.threshold_, self._registry()
        )
        native_scores = Preprocessor.invert(scores, prep.record, order=1)
        native_mask = Preprocessor.invert(mask.astype(np.float32), prep.record, order=0) > 0.5
        # interpolation back to the native grid must not leak scores outside the scan's own foreground
        native_fg = foreground_mask(prep.source.array, self.config.data.preprocessing.foreground)
        native_scores[~native_fg] = 0.0
        if cfg.postprocess.restrict_to_foreground:
            native_mask &= native_fg
        return ScoreResult(
            prep.source,
            native_scores,
            native_mask,
            vscore,
            bool(vscore > self.volume_threshold_),
            threshold,
            prep,
            scores,
            time.perf_counter() - t0,
            native_fg,
        )

    def score_map(self, item: VolumeLike) -> tuple[np.ndarray, dict[str, Any]]:
        """Seed API: the voxel score map on the input's grid, and metadata."""
        r = self.score(item)
        meta = {
            "volume_score": r.volume_score,
            "is_anomalous": r.is_anomalous,
            "threshold": r.threshold,
            "affine": r.volume.affine,
            "seconds": r.seconds,
            "preprocessed_shape": r.prepared.array.shape,
        }
        return r.score_map, meta

    def predict(self, item: VolumeLike) -> np.ndarray:
        """Seed API: the binary anomaly mask on the input's grid."""
        return self.score(item).mask

    def get_threshold(self) -> float:
        self._check_fitted("get_threshold")
        return self.threshold_

    def evaluate(
        self, volumes: Sequence[VolumeLike], ground_truth: Sequence[np.ndarray | VolumeLike]
    ) -> dict[str, Any]:
        """Seed API: metrics against ground-truth masks (see :func:`evaluation.comprehensive_evaluation`)."""
        from anomaly3d_core.evaluation.metrics import comprehensive_evaluation

        results = [self.score(v) for v in volumes]
        masks = [
            np.asarray(g) > 0 if isinstance(g, np.ndarray) else _mask_array(g, self.registry)
            for g in ground_truth
        ]
        return comprehensive_evaluation(
            masks,
            [r.score_map for r in results],
            self.threshold_,
            volume_scores=[r.volume_score for r in results],
            volume_threshold=self.volume_threshold_,
        )

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold_,
            "volume_threshold": self.volume_threshold_,
            "score_stats": self.score_stats_,
            "normal_volume_scores": self.normal_volume_scores_,
            "history": getattr(self, "history_", {}),
        }

    def save_files(self, path: str | Path) -> Path:
        """Write config, weights and fitted state into ``path`` (a plain folder)."""
        self._check_fitted("save")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save(out / CONFIG_FILE)
        torch.save({k: v.cpu() for k, v in self.model_.state_dict().items()}, out / WEIGHTS_FILE)
        (out / STATE_FILE).write_text(json.dumps(self.state_dict(), indent=2))
        if getattr(self, "normative_", None) is not None:
            np.savez_compressed(out / NORMATIVE_FILE, **self.normative_)
        example = self.example_volume()
        if example is not None:  # a scan this model accepts, for the MLflow input example
            from anomaly3d_core.io.files import save_nifti

            save_nifti(example.array, example.affine, out / EXAMPLE_FILE)
        return out

    def example_volume(self) -> Volume | None:
        """A held-out normal scan this model was calibrated on (kept with a saved model), if any."""
        volumes = getattr(self, "val_volumes_", None)
        return volumes[0] if volumes else getattr(self, "example_", None)

    def save(self, path: str | Path) -> Path:
        """Save as an MLflow pyfunc model folder (servable with ``mlflow models serve``)."""
        from anomaly3d_core.mlops.serving import save_pyfunc

        return save_pyfunc(self, path)

    @classmethod
    def load_files(
        cls, path: str | Path, device: str | None = None, registry: Any = None
    ) -> AnomalyDetectionPipeline:
        folder = Path(path)
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE) if not (folder / f).is_file()]
        if missing:
            raise Anomaly3DError(f"{folder}: not a saved anomaly3d model (missing {', '.join(missing)})")
        pipe = cls(folder / CONFIG_FILE, device=device, registry=registry)
        pipe.model_ = pipe.build_network()
        pipe.model_.load_state_dict(torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        pipe.model_.to(pipe.device).eval()
        state = json.loads((folder / STATE_FILE).read_text())
        pipe._set_calibration(state)
        pipe.history_ = state.get("history", {})
        pipe.normative_ = None
        if (folder / EXAMPLE_FILE).is_file():
            from anomaly3d_core.io.files import load_volume

            pipe.example_ = load_volume(folder / EXAMPLE_FILE)
        if (folder / NORMATIVE_FILE).is_file():
            with np.load(folder / NORMATIVE_FILE) as z:
                pipe.normative_ = {"mean": z["mean"], "std": z["std"]}
        return pipe

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, registry: Any = None) -> Any:
        """Load a model saved by :meth:`save` (an MLflow model folder) or :meth:`save_files`.

        A saved ensemble comes back as an :class:`~anomaly3d_core.ensemble.EnsemblePipeline`.
        """
        from anomaly3d_core.ensemble import load_model

        return load_model(path, device, registry)

    def plugin_specs(self) -> list[tuple[str, str]]:
        return self.config.plugin_specs()


def _mask_array(item: VolumeLike, registry: Any) -> np.ndarray:
    from anomaly3d_core.io.files import load_volume

    if isinstance(item, Volume):
        return np.asarray(item.array) > 0
    return load_volume(item, registry=registry, allow_constant=True).array > 0


def create_simple_pipeline(
    patch_size: tuple[int, int, int] = (8, 8, 8),
    hidden_dims: Sequence[int] = (128, 64),
    latent_dim: int = 32,
    autoencoder_type: str = "standard",
    **config: Any,
) -> AnomalyDetectionPipeline:
    """Seed API: raw-intensity patches (``identity`` extractor, ``flatten``) into an autoencoder."""
    tree = _merge(
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
    tree = _merge(
        {
            "patches": {"patch_size": list(patch_size), "stride": [max(1, s // 2) for s in patch_size]},
            "extractor": {"type": model_type, "layers": list(layers)},
            "embedding": {"embedding_method": "avg"},
            "autoencoder": {"type": autoencoder_type},
        },
        config,
    )
    return AnomalyDetectionPipeline(tree)
