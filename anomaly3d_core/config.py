"""Pydantic configuration: one model per component, composed into :class:`PipelineConfig`.

YAML files map one-to-one onto these models; unknown keys are rejected with their full dotted
path, and each plugin's ``args`` are validated against that plugin's own ``Params`` model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from anomaly3d_core import safe_yaml
from anomaly3d_core.config_data import (  # noqa: F401  (re-exported: every section is importable from here)
    AugmentationConfig,
    DataConfig,
    PreprocessingConfig,
    Section,
    Triple,
    _triple,
)
from anomaly3d_core.config_tree import (  # noqa: F401  (re-exported: the config's public helpers)
    flatten,
    format_validation_error,
    merge_trees,
    name_sources,
    parse_value,
    seed_component_sections,
)
from anomaly3d_core.errors import ConfigError, PluginError
from anomaly3d_core.registry import get_registry

RUN_SECTIONS = ("tracking", "tuning")  # the run's settings, not the detector's: not kept in a model folder


class ComponentSpec(Section):
    """A plugin choice: its registered ``type`` name (or ``package:name``) and its ``args``.

    Default ``args`` belong to the default ``type``: a section that names another type without
    giving ``args`` starts from that component's own defaults (``--set threshold.type=sigma`` does
    not inherit the percentile's ``percentile: 99.5``).
    """

    type: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _args_follow_type(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "type" in data and "args" not in data:
            default = cls.model_fields["type"].default
            if data["type"] != default:
                return {**data, "args": {}}
        return data


class PatchConfig(Section):
    patch_size: Triple = (8, 8, 8)
    stride: Triple = (4, 4, 4)
    max_patches: int = Field(4000, ge=1, description="training patches sampled per volume")
    sampling_strategy: Literal["random", "uniform"] = "random"
    min_foreground: float = Field(0.5, ge=0, le=1, description="foreground fraction a training patch needs")
    scales: list[int] = Field(
        default_factory=lambda: [1],
        description="multi-scale patches: context patches of patch_size*scale around each patch, "
        "average-pooled back to patch_size, embedded side by side",
    )
    score_mode: Literal["auto", "voxel", "patch"] = Field(
        "auto",
        description="voxel: blend each patch's per-voxel residuals (flatten embedding only); "
        "patch: blend one error per patch; auto: voxel when possible",
    )

    residual_sign: (
        Literal["both", "bright", "dark", "physics"] | dict[str, Literal["both", "bright", "dark"]]
    ) = Field(
        "both",
        description="which sign of the reconstruction residual counts (voxel scoring of intensities): "
        "bright (scan above its reconstruction), dark, both; physics: FLAIR/T2w bright, T1w and other "
        "suffixes both; or per sequence, e.g. {FLAIR: bright, T1w: both}",
    )
    channel_combine: Literal["mean", "max"] = Field(
        "mean", description="how the sequences' per-voxel residuals become one score: their mean or max"
    )

    _triple = field_validator("patch_size", "stride", mode="before")(_triple)

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"scales must be distinct positive integers, got {v}")
        return sorted(v)


class ExtractorConfig(ComponentSpec):
    type: str = "identity"
    layers: list[str] | None = None
    checkpoint: str | None = None
    pretrain_epochs: int = Field(
        0, ge=0, description="self-supervised pretraining on the training normals; 0 = random frozen"
    )
    pretrain_crop: int = Field(32, ge=8)


class EmbeddingConfig(Section):
    embedding_method: Literal["flatten", "avg", "max", "adaptive", "mlp"] = "flatten"
    adaptive_size: int = Field(2, ge=1)
    mlp_hidden_dims: list[int] = Field(default_factory=lambda: [256])
    output_dim: int = Field(64, ge=1)
    positional_weight: float = Field(
        0.0,
        ge=0,
        description="append the patch centre's normalised (x, y, z) times this weight; for aligned scans",
    )
    input_channels: int | None = Field(
        None, description="derived from the extractor; accepted for seed configs"
    )
    patch_size: Triple | None = Field(None, description="alias of patches.patch_size in seed configs")

    _triple = field_validator("patch_size", mode="before")(_triple)


class AutoencoderConfig(ComponentSpec):
    type: str = "standard"


class TrainingConfig(Section):
    batch_size: int = Field(256, ge=1)
    num_epochs: int = Field(30, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw"] = "adam"
    scheduler_type: Literal["cosine", "step", "plateau", "none"] = "cosine"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.5, gt=0)
    grad_clip: float | None = 1.0
    early_stopping_patience: int = Field(8, ge=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    calibration_folds: int = Field(
        0,
        ge=0,
        description="cross-fitting: K >= 2 fits K extra models, each without one fold of the training "
        "normals, and calibrates the p-values on every training normal scored by the model that never saw "
        "it (used when fit gets no val_volumes); 0 = calibrate on the validation split only",
    )
    use_amp: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(0, ge=0)
    checkpoint_dir: str | None = None
    resume: bool = False


class PostprocessConfig(Section):
    restrict_to_foreground: bool = True
    opening: int = Field(0, ge=0, description="radius in voxels, 0 = off")
    closing: int = Field(0, ge=0)
    min_component_mm3: float = Field(0.0, ge=0)
    keep_largest: bool = False


class VolumeDecisionConfig(Section):
    top_k_fraction: float = Field(
        0.01, gt=0, le=1, description="volume score = mean of the top fraction of voxel scores"
    )
    method: ComponentSpec = Field(default_factory=lambda: ComponentSpec(type="sigma", args={"k": 2.0}))


class ThresholdConfig(ComponentSpec):
    type: str = "percentile"
    args: dict[str, Any] = Field(default_factory=lambda: {"percentile": 99.5})
    smoothing_sigma: float = Field(1.0, ge=0, description="Gaussian smoothing of score maps, in voxels")
    normative: bool = Field(
        False,
        description="score each voxel against the normal scores at the same location (z-value); "
        "scans must share one grid: template-space or registered data with crop_foreground off",
    )
    scan_normalization: Literal["none", "robust"] = Field(
        "none",
        description="robust: each scan's scores become (s - median) / (1.4826 MAD) over its own "
        "foreground, so scans from different grids, sites and noise levels share one scale",
    )
    depth_normalization: bool = Field(
        False,
        description="score each voxel against the training normals' scores at the same depth (mm from "
        "the foreground's edge): removes the edge effects of each scan's own pose, field of view and "
        "voxel size without needing a shared grid",
    )
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    volume: VolumeDecisionConfig = Field(default_factory=VolumeDecisionConfig)
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="scan decision: anomalous when the scan's conformal p-value against the calibration "
        "normals is <= alpha (a normal scan is flagged with probability <= alpha); also the family-wise "
        "level of the cluster mask",
    )
    fdr_q: float = Field(
        0.1, gt=0, lt=1, description="mask_rule fdr: Benjamini-Hochberg level over the brain's voxel p-values"
    )
    cluster_forming_p: float = Field(
        0.001, gt=0, lt=1, description="mask_rule cluster: voxels with p <= this form the clusters"
    )
    mask_rule: Literal["cluster", "fdr", "threshold"] = Field(
        "cluster",
        description="the decision mask: clusters significant at alpha (family-wise), voxels kept by "
        "Benjamini-Hochberg at fdr_q, or scores above the calibrated voxel threshold (no stated error rate)",
    )
    scan_statistic: Literal["max_cluster_mass", "top_k_mean"] = Field(
        "max_cluster_mass",
        description="the volume score whose p-value decides the scan: the largest cluster mass, or the "
        "mean of the top volume.top_k_fraction of voxel scores",
    )


class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = None
    experiment_name: str = "anomaly3d"
    log_score_maps: int = Field(2, ge=0)
    run_name: str | None = Field(
        None, description="the run's name (default: '<command> <config> on <data set>')"
    )
    register_as: str | None = Field(
        None,
        description="register the run's model under this name (NAME or NAME@ALIAS; alias default "
        "'champion'), servable as models:/NAME@ALIAS",
    )


class TuningConfig(Section):
    n_trials: int = Field(10, ge=1)
    metric: str = "voxel_ap"
    direction: Literal["maximize", "minimize"] = "maximize"
    report_every: int = Field(5, ge=1, description="epochs between validation reports to the pruner")
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)


class PipelineConfig(Section):
    """Everything a pipeline needs; every section has working defaults."""

    data: DataConfig = Field(default_factory=DataConfig)
    patches: PatchConfig = Field(default_factory=PatchConfig)
    extractor: ExtractorConfig = Field(default_factory=ExtractorConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)

    @model_validator(mode="after")
    def _residual_sign(self) -> PipelineConfig:
        sign = self.patches.residual_sign
        if isinstance(sign, dict):
            names = self.data.sequences or []
            if not names:
                raise ValueError(
                    "patches.residual_sign: a per-sequence mapping needs data.sequences; for one file per "
                    "scan give one of both, bright, dark"
                )
            unknown = [k for k in sign if k not in names]
            if unknown:
                raise ValueError(
                    f"patches.residual_sign: '{unknown[0]}' is not one of data.sequences {names}"
                )
        return self

    @model_validator(mode="after")
    def _patch_alias(self) -> PipelineConfig:
        if self.embedding.patch_size is not None and self.embedding.patch_size != self.patches.patch_size:
            self.patches.patch_size = self.embedding.patch_size
        return self

    def to_yaml(self, detector_only: bool = False) -> str:
        """The config as YAML; ``detector_only`` leaves out the run's settings (``tracking``,
        ``tuning``), as a model folder keeps it."""
        exclude = set(RUN_SECTIONS) if detector_only else None
        return yaml.safe_dump(self.model_dump(mode="json", exclude=exclude), sort_keys=False)

    def save(self, path: str | Path, detector_only: bool = False) -> None:
        Path(path).write_text(self.to_yaml(detector_only))

    @property
    def is_ensemble(self) -> bool:
        return False

    def reference(self) -> PipelineConfig:
        """The pipeline config that says how scans are read: this one (an ensemble's: its first member's)."""
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``training.num_epochs``), for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def components(self) -> dict[str, str]:
        """The model's parts by role, as tags and reports name them."""
        return {
            "detector": "pipeline",
            "extractor": self.extractor.type,
            "embedding": self.embedding.embedding_method,
            "autoencoder": self.autoencoder.type,
        }

    def plugin_specs(self) -> list[tuple[str, str]]:
        """``(family, name)`` of every plugin this config names (the loader when one is named, extra steps)."""
        specs = [
            ("extractors", self.extractor.type),
            ("autoencoders", self.autoencoder.type),
            ("thresholds", self.threshold.type),
            ("thresholds", self.threshold.volume.method.type),
        ]
        return specs + self.data.plugin_specs()


# component section -> its family: the sections whose ``type`` picks a plugin with its own ``args``
_COMPONENT_SECTIONS = {
    "extractor": "extractors",
    "autoencoder": "autoencoders",
    "threshold": "thresholds",
    "method": "thresholds",
}


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str], registry: Any = None) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested dict.

    ``args`` belong to the component they were written for: an override that changes a
    component's ``type`` (or ``data.loader``) without also setting its ``args`` keeps only the
    arguments the new component declares.
    """
    items = list(overrides)
    keys = [item.split("=", 1)[0].strip() for item in items]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got '{item}'")
        key, value = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        new = parse_value(value)
        old = node.get(parts[-1])
        node[parts[-1]] = new
        if parts[-1] == "type" and len(parts) > 1 and parts[-2] in _COMPONENT_SECTIONS:
            family, args_key = _COMPONENT_SECTIONS[parts[-2]], "args"
        elif parts[-2:] == ["data", "loader"]:
            family, args_key = "loaders", "loader_args"
        else:
            continue
        if old is None:  # the section's type was left at its default
            old = _default_type(parts[-2] if family != "loaders" else "loader")
        args = node.get(args_key)
        prefix = ".".join(parts[:-1] + [args_key])
        if (
            old is not None
            and old != new
            and isinstance(args, dict)
            and args
            and not any(k == prefix or k.startswith(prefix + ".") for k in keys)
        ):
            node[args_key] = _args_kept(family, new, args, registry)
    return tree


def _default_type(section: str) -> str | None:
    defaults = {
        "extractor": ExtractorConfig.model_fields["type"].default,
        "autoencoder": AutoencoderConfig.model_fields["type"].default,
        "threshold": ThresholdConfig.model_fields["type"].default,
        "method": VolumeDecisionConfig().method.type,
        "loader": DataConfig.model_fields["loader"].default,
    }
    return defaults.get(section)


def _args_kept(family: str, name: Any, args: dict[str, Any], registry: Any) -> dict[str, Any]:
    """The ``args`` (written for another component) that component ``name`` also declares."""
    if not isinstance(name, str) or (family == "loaders" and name == "auto"):
        return {}
    try:
        fields = (registry or get_registry()).get(family, name).Params.model_fields
    except PluginError:
        return {}  # the unknown name is reported when the config is validated
    return {k: v for k, v in args.items() if k in fields}


def validate_plugins(config: PipelineConfig, registry: Any = None) -> PipelineConfig:
    """Check plugin names and each plugin's ``args`` against its ``Params`` model."""
    registry = registry or get_registry()
    specs = [
        ("extractors", "extractor", config.extractor),
        ("autoencoders", "autoencoder", config.autoencoder),
        ("thresholds", "threshold", config.threshold),
        ("thresholds", "threshold.volume.method", config.threshold.volume.method),
    ]
    specs += [
        ("steps", f"data.preprocessing.steps.{i}", s) for i, s in enumerate(config.data.preprocessing.steps)
    ]
    for family, key, spec in specs:
        try:
            cls = registry.get(family, spec.type)
        except PluginError as exc:
            raise ConfigError(f"{key}.type: {exc}") from None
        try:
            spec.args = cls.Params(**spec.args).model_dump(mode="json", exclude_unset=True)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls.Params, prefix=f"{key}.args.")) from None
    if config.data.loader != "auto":
        try:
            loader = registry.get("loaders", config.data.loader)
        except PluginError as exc:
            raise ConfigError(f"data.loader: {exc}") from None
        try:
            config.data.loader_args = loader.Params(**config.data.loader_args).model_dump(
                mode="json", exclude_unset=True
            )
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, loader.Params, prefix="data.loader_args.")
            ) from None
    elif config.data.loader_args:
        raise ConfigError("data.loader_args needs a named data.loader (loader arguments differ per format)")
    return config


def build_config(
    tree: Mapping[str, Any] | None = None, overrides: Iterable[str] = (), registry: Any = None
) -> PipelineConfig:
    """Validate a nested dict (plus ``--set`` overrides) into a :class:`PipelineConfig`."""
    data = apply_overrides(copy.deepcopy(dict(tree or {})), overrides, registry)
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, PipelineConfig)) from None
    return validate_plugins(config, registry)


def load_config(
    path: str | Path | None, overrides: Iterable[str] = (), registry: Any = None
) -> PipelineConfig:
    """Read a YAML config (or defaults when ``path`` is None) and validate it."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = safe_yaml.load_file(p) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"{p}: not valid YAML ({exc.__class__.__name__}: {exc})".replace("\n", " ")
            ) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(tree).__name__}")
    try:
        return build_config(tree, overrides, registry)
    except ConfigError as exc:
        raise ConfigError(name_sources(str(exc), path, overrides)) from None
