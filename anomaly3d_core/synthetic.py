"""The synthetic-anomaly detector: a segmentation network trained to find what is foreign.

During ``fit`` normal scans are corrupted on the fly (:mod:`anomaly3d_core.model.corruption`) and a
3D segmentation network (a ``segmenters`` plugin; built in: ``unet``) learns to predict, per
voxel, how much of it is foreign. Its sigmoid output is the score map, post-processed, calibrated
on held-out normals and decided by the same :class:`PostProcessor` as a pipeline's. Reading and
preprocessing are the pipeline's (native grids, registration, several sequences as channels).

A YAML config with a top-level ``synthetic`` section builds one::

    synthetic:
      data: {preprocessing: {target_spacing: 2.0}}
      network: {type: unet, args: {channels: [16, 32, 64]}}
      corruption: {kinds: [foreign, intensity], max_foci: 4}
      validation: {kinds: [texture, ring]}
      training: {iterations: 600, crop_size: 32}
      threshold: {smoothing_sigma: 0.5}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from anomaly3d_core.config import (
    ComponentSpec,
    DataConfig,
    PipelineConfig,
    Section,
    ThresholdConfig,
    TrackingConfig,
    apply_overrides,
    flatten,
    format_validation_error,
    validate_plugins,
)
from anomaly3d_core.errors import ConfigError, PluginError
from anomaly3d_core.io.data import VolumeLike
from anomaly3d_core.model import distributed
from anomaly3d_core.model.corruption import CorruptionSpec
from anomaly3d_core.model.segmentation import LoopSettings, segment_volume, train_segmenter, validation_set
from anomaly3d_core.model.training import EpochCallback, resolve_device
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.preprocess.preprocessing import Prepared, Preprocessor

log = logging.getLogger(__name__)
Kind = Literal["foreign", "intensity", "texture", "ring"]  # anomaly3d_core.model.corruption.KINDS


def _range(v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1]:
        raise ValueError(f"give (low, high) with 0 < low <= high, got {list(v)}")
    return v


class NetworkConfig(ComponentSpec):
    type: str = "unet"


class CorruptionConfig(Section):
    """The synthetic anomalies the network is trained on (see :mod:`anomaly3d_core.model.corruption`)."""

    kinds: list[Kind] = Field(default_factory=lambda: ["foreign", "intensity"], min_length=1)
    max_foci: int = Field(4, ge=1, description="foci per corrupted crop: 1..max_foci")
    radius_range: tuple[float, float] = Field((0.6, 8.0), description="focus radius, working-grid voxels")
    change_range: tuple[float, float] = Field(
        (0.15, 0.8), description="relative intensity change (darker: 1 - c, brighter: 1 + 1.5 c)"
    )
    edge_sigma: tuple[float, float] = Field((0.3, 1.2), description="blur of a focus's edge, voxels")
    clean_fraction: float = Field(0.2, ge=0, lt=1, description="crops left unchanged (target 0)")
    normal_variation: float = Field(
        0.5, ge=0, le=1, description="fraction of crops given a bias field, gamma, noise or blur first"
    )

    _ranges = field_validator("radius_range", "change_range")(_range)

    @field_validator("edge_sigma")
    @classmethod
    def _edge(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"give (low, high) with 0 <= low <= high, got {list(v)}")
        return v

    def spec(self) -> CorruptionSpec:
        return CorruptionSpec(
            tuple(self.kinds),
            self.max_foci,
            self.radius_range,
            self.change_range,
            self.edge_sigma,
            self.clean_fraction,
        )


class SyntheticValidationConfig(CorruptionConfig):
    """Held-out normals corrupted with other kinds (fainter, smaller): picks the training length."""

    kinds: list[Kind] = Field(default_factory=lambda: ["ring"], min_length=1)
    radius_range: tuple[float, float] = (0.6, 6.0)
    change_range: tuple[float, float] = (0.1, 0.5)
    samples_per_scan: int = Field(1, ge=1, description="corrupted copies of each validation normal")
    max_scans: int = Field(4, ge=1, description="validation normals scored at each check")


class SyntheticTrainingConfig(Section):
    iterations: int = Field(600, ge=1)
    crop_size: int = Field(32, ge=8, description="training crops of crop_size³ voxels (multiple of 8)")
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    dice_weight: float = Field(1.0, ge=0, description="soft Dice added to the binary cross-entropy")
    validate_every: int = Field(100, ge=1, description="iterations between validation checks")
    val_fraction: float = Field(0.2, ge=0, lt=1)
    use_amp: bool = Field(True, description="mixed precision when on CUDA (ignored on the CPU)")
    seed: int = 0
    device: str = "auto"

    @field_validator("crop_size")
    @classmethod
    def _crop(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"crop_size must be a multiple of 8 (the U-Net halves it three times), got {v}")
        return v


class SyntheticConfig(Section):
    """Everything a synthetic-anomaly detector needs; every section has working defaults."""

    data: DataConfig = Field(default_factory=DataConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    validation: SyntheticValidationConfig = Field(default_factory=SyntheticValidationConfig)
    training: SyntheticTrainingConfig = Field(default_factory=SyntheticTrainingConfig)
    threshold: ThresholdConfig = Field(
        default_factory=lambda: ThresholdConfig(smoothing_sigma=0.5, volume={"top_k_fraction": 0.001})
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _augmentation(self) -> SyntheticConfig:
        if self.data.augmentation.enabled:
            raise ValueError(
                "data.augmentation: the synthetic detector varies its crops itself; use "
                "corruption.normal_variation instead of data.augmentation.enabled"
            )
        return self

    def to_yaml(self, detector_only: bool = False) -> str:
        """The config as YAML; ``detector_only`` leaves out the run's settings (``tracking``), as a
        model folder keeps it."""
        exclude = {"tracking"} if detector_only else None
        return yaml.safe_dump({"synthetic": self.model_dump(mode="json", exclude=exclude)}, sort_keys=False)

    @property
    def is_ensemble(self) -> bool:
        return False

    def reference(self) -> SyntheticConfig:
        """This config: it says how scans are read (``data``)."""
        return self

    def save(self, path: str | Path, detector_only: bool = False) -> None:
        Path(path).write_text(self.to_yaml(detector_only))

    def flat(self) -> dict[str, Any]:
        return flatten(self.model_dump(mode="json"))

    def components(self) -> dict[str, str]:
        """The model's parts by role, as tags and reports name them."""
        return {"detector": "synthetic", "segmenter": self.network.type}

    def plugin_specs(self) -> list[tuple[str, str]]:
        specs = [
            ("segmenters", self.network.type),
            ("thresholds", self.threshold.type),
            ("thresholds", self.threshold.volume.method.type),
        ]
        return specs + self.data.plugin_specs()


def build_synthetic_config(
    tree: Mapping[str, Any] | None = None, overrides: Sequence[str] = (), registry: Any = None
) -> SyntheticConfig:
    """Validate a ``synthetic`` section (plus ``--set`` overrides, written without the ``synthetic.`` prefix)."""
    from anomaly3d_core.registry import get_registry

    data = apply_overrides(dict(tree or {}), overrides, registry)
    try:
        cfg = SyntheticConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, SyntheticConfig, prefix="synthetic.")) from None
    reg = registry or get_registry()
    try:
        cls = reg.get("segmenters", cfg.network.type)
    except PluginError as exc:
        raise ConfigError(f"synthetic.network.type: {exc}") from None
    try:
        cfg.network.args = cls.Params(**cfg.network.args).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, cls.Params, prefix="synthetic.network.args.")
        ) from None
    checked = PipelineConfig(data=cfg.data, threshold=cfg.threshold)
    try:
        validate_plugins(checked, reg)
    except ConfigError as exc:
        raise ConfigError(f"synthetic.{exc}") from None
    cfg.data, cfg.threshold = checked.data, checked.threshold
    return cfg


def _read_tree(path: str | Path) -> Any:
    """A YAML file through ``yaml.safe_load``, errors as one line."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot be read as YAML ({exc.__class__.__name__})") from None


class SyntheticAnomalyDetector(AnomalyDetectionPipeline):
    """Fit a segmentation network on normal scans with synthetic anomalies; score with its output.

    It reads, preprocesses, caches, splits, saves and loads as :class:`AnomalyDetectionPipeline`
    does (it inherits that part: ``config.yaml`` with a top-level ``synthetic`` section,
    ``weights.pt``, ``state.json``); the network, its training and the raw scores are its own.
    """

    def __init__(
        self,
        config: SyntheticConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        device: str | None = None,
        registry: Any = None,
    ) -> None:
        if isinstance(config, str | Path):
            tree = _read_tree(config)
            if not isinstance(tree, dict) or "synthetic" not in tree:
                raise ConfigError(
                    f"{config}: a synthetic-detector config has a top-level 'synthetic' section"
                )
            config = tree["synthetic"] or {}
        if not isinstance(config, SyntheticConfig):
            config = build_synthetic_config(config or {}, registry=registry)
        self.config = config
        self.registry = registry
        self.device = resolve_device(device or config.training.device)
        self.preprocessor = Preprocessor(config.data.preprocessing, registry, config.data.coregister)

    def build_network(self) -> torch.nn.Module:
        """A fresh, untrained network: one input channel per sequence."""
        cls = self._registry().get("segmenters", self.config.network.type)
        return cls(max(1, len(self.channels)), self.config.network.args)

    def set_reading(self, overrides: Sequence[str]) -> None:
        bad = [o for o in overrides if not o.strip().startswith(("data.loader=", "data.loader_args"))]
        if bad:
            raise ConfigError(
                f"--set {bad[0]}: a fitted model keeps its config; only data.loader and data.loader_args "
                "can be set here; refit with --set to change anything else"
            )
        tree = self.config.model_dump(mode="json")
        self.config.data = build_synthetic_config(tree, overrides, self.registry).data

    # ---------------------------------------------------------------- fitting
    def fit(
        self,
        volumes: Sequence[VolumeLike],
        val_volumes: Sequence[VolumeLike] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        show_progress: bool | None = None,
    ) -> SyntheticAnomalyDetector:
        """Train on normal scans with synthetic anomalies; calibrate on held-out normals."""
        cfg = self.config
        t0 = time.perf_counter()
        gen, train, val = self._fit_sets(volumes, val_volumes)
        if not val:
            train, val = self._split(train, gen)
        device = distributed.local_device() or self.device
        self.model_ = self.build_network().to(device)
        t, v = cfg.training, cfg.validation
        held = val[: v.max_scans]  # held out of training unless there were too few scans to split
        checks = validation_set(
            [p.array for p in held],
            [p.mask for p in held],
            v.spec(),
            v.samples_per_scan,
            t.seed,
            self.channels,
        )
        settings = LoopSettings(
            t.iterations,
            t.crop_size,
            t.batch_size,
            t.learning_rate,
            t.weight_decay,
            t.dice_weight,
            t.validate_every,
            cfg.corruption.normal_variation,
            t.use_amp,
            t.seed,
        )
        self.history_ = train_segmenter(
            self.model_,
            [p.array for p in train],
            [p.mask for p in train],
            cfg.corruption.spec(),
            settings,
            device,
            checks,
            self.channels,
            callbacks,
        )
        if cfg.threshold.depth_normalization:
            self.postprocessor_.fit_depth(
                [self._scan_scores(p) for p in train], [p.mask for p in train], [p.spacing for p in train]
            )
        if cfg.threshold.normative:
            self.postprocessor_.fit_normative([self._scan_scores(p) for p in train])
        self.calibrate(val)
        self.n_train_volumes_, self.n_val_volumes_ = len(train), len(val)
        self.val_volumes_ = [p.source for p in val]
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    # ---------------------------------------------------------------- scoring
    def _scan_scores(self, prep: Prepared) -> Any:
        device = next(self.model_.parameters()).device
        raw = segment_volume(self.model_, prep.array, device, self.config.training.use_amp)
        return self.postprocessor_.scan_scores(raw, prep.mask)
