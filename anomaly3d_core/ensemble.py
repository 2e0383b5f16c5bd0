"""Ensembles: several detectors whose scores, each normalised against its own normal-validation
statistics, are combined voxel by voxel (mean or max) on the input's grid.

A YAML config with a top-level ``ensemble`` section builds one; a member is a pipeline config, a
synthetic-anomaly detector's (a top-level ``synthetic`` section), or a path to either::

    ensemble:
      combine: mean
      members:
        - {extractor: {type: identity}, autoencoder: {type: standard}}
        - experiments/configs/brain_mri.yaml           # a path works too
        - experiments/configs/brain_mri_synthetic.yaml # a synthetic-anomaly detector
      threshold: {type: percentile, args: {percentile: 99.5}}
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from anomaly3d_core import safe_yaml
from anomaly3d_core.config import (
    PipelineConfig,
    Section,
    ThresholdConfig,
    TrackingConfig,
    apply_overrides,
    build_config,
    flatten,
    format_validation_error,
    validate_plugins,
)
from anomaly3d_core.detector import Detector
from anomaly3d_core.errors import Anomaly3DError, ConfigError
from anomaly3d_core.io.data import VolumeLike, as_volume
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.model.training import EpochCallback
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.postprocess.calibration import last_calibration_warns
from anomaly3d_core.postprocess.native import native_prepared, to_native
from anomaly3d_core.postprocess.postprocessor import PostProcessor
from anomaly3d_core.preprocess.preprocessing import Prepared
from anomaly3d_core.preprocess.sequences import align
from anomaly3d_core.synthetic import SyntheticAnomalyDetector, SyntheticConfig, build_synthetic_config

ENSEMBLE_FILE = "ensemble.json"
#: a member's config: a pipeline's (tried first, so a plain dict is one), or a synthetic detector's
Member = Annotated[PipelineConfig | SyntheticConfig, Field(union_mode="left_to_right")]


class EnsembleConfig(Section):
    combine: Literal["mean", "max"] = "mean"
    members: list[Member] = Field(min_length=2)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def flat(self) -> dict[str, Any]:
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        tree = self.model_dump(mode="json")
        tree["members"] = [
            {"synthetic": dumped} if isinstance(m, SyntheticConfig) else dumped
            for m, dumped in zip(self.members, tree["members"], strict=True)
        ]
        return yaml.safe_dump({"ensemble": tree}, sort_keys=False)

    @property
    def is_ensemble(self) -> bool:
        return True

    def reference(self) -> PipelineConfig:
        """The first member's config: members read scans alike (one set of sequences)."""
        return self.members[0]

    def plugin_specs(self) -> list[tuple[str, str]]:
        """``(family, name)`` of every plugin the ensemble and its members name."""
        specs = [("thresholds", self.threshold.type), ("thresholds", self.threshold.volume.method.type)]
        for m in self.members:
            specs += [spec for spec in m.plugin_specs() if spec not in specs]
        return specs

    @field_validator("members", mode="before")
    @classmethod
    def _load_paths(cls, members: Any) -> Any:
        out = []
        for m in members or []:
            if isinstance(m, str):
                path = Path(m)
                if not path.is_file():
                    raise ValueError(f"member config file not found: {m}")
                try:
                    m = safe_yaml.load_file(path) or {}
                except yaml.YAMLError as exc:
                    raise ValueError(
                        f"member config {m}: not valid YAML ({exc.__class__.__name__})"
                    ) from None
            out.append(_synthetic_member(m) if isinstance(m, dict) and "synthetic" in m else m)
        return out


def _synthetic_member(tree: dict[str, Any]) -> SyntheticConfig:
    """A member given as ``{synthetic: {...}}`` (inline or from a file): a synthetic detector's config."""
    try:
        return SyntheticConfig.model_validate(tree["synthetic"] or {})
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, SyntheticConfig, prefix="synthetic.")) from None


def build_ensemble_config(
    tree: Mapping[str, Any], overrides: Sequence[str] = (), registry: Any = None
) -> EnsembleConfig:
    """Validate an ``ensemble`` section; ``--set`` overrides apply to every member that has the key
    (a pipeline's ``training.num_epochs``, a synthetic detector's ``training.iterations``), and to
    every member when none has it, so that a typo is refused with the member's own message."""
    try:
        cfg = EnsembleConfig.model_validate(dict(tree))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, EnsembleConfig, prefix="ensemble.")) from None
    trees = [member.model_dump(mode="json") for member in cfg.members]
    targets = {
        o: [i for i, t in enumerate(trees) if _has_key(t, o.split("=", 1)[0].strip())] for o in overrides
    }
    members: list[Member] = []
    for i, (member, tree) in enumerate(zip(cfg.members, trees, strict=True)):
        mine = [o for o in overrides if i in targets[o] or not targets[o]]
        try:
            if isinstance(member, SyntheticConfig):
                members.append(build_synthetic_config(tree, mine, registry))
            else:
                members.append(build_config(apply_overrides(tree, mine, registry), registry=registry))
        except ConfigError as exc:
            raise ConfigError(f"ensemble.members.{i}: {exc}") from None
    cfg.members = members
    thresholds = PipelineConfig(threshold=cfg.threshold)
    validate_plugins(thresholds, registry)
    return cfg


def _has_key(tree: Mapping[str, Any], dotted: str) -> bool:
    """Whether a member's config tree has the dotted key (any key under a free ``*args`` mapping counts)."""
    node: Any = tree
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping):
            return False
        if part not in node:
            return depth > 0 and parts[depth - 1].endswith("args")
        node = node[part]
    return True


def combine_members(
    volume: Volume, members: Sequence[Detector], combine: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble formula, on the input's grid, and the input's foreground.

    Each member's final scores become z-values against its own normal-validation statistics on
    its own working grid (negative values count as 0: only above-normal evidence), are mapped
    back to the input's grid, and are combined voxel by voxel with the mean or the max.
    """
    maps, fg = [], None
    for member in members:
        prep = member.prepare(volume)
        z = np.maximum(member.normalized(member.score_prepared(prep)), 0.0)
        z[~prep.mask] = 0.0
        native, member_fg = to_native(z, prep, member.foreground_method)
        maps.append(native)
        fg = member_fg if fg is None else fg
    combined = np.mean(maps, axis=0) if combine == "mean" else np.max(maps, axis=0)
    combined[~fg] = 0.0
    return combined.astype(np.float32), fg


def _member(config: PipelineConfig | SyntheticConfig, device: str | None, registry: Any) -> Detector:
    if isinstance(config, SyntheticConfig):
        return SyntheticAnomalyDetector(config, device=device, registry=registry)
    return AnomalyDetectionPipeline(config, device=device, registry=registry)


def _load_member(folder: Path, device: str | None, registry: Any) -> Detector:
    """A saved member: a synthetic detector when its ``config.yaml`` has a ``synthetic`` section."""
    tree = safe_yaml.load_file(folder / "config.yaml") if (folder / "config.yaml").is_file() else None
    kind = (
        SyntheticAnomalyDetector
        if isinstance(tree, dict) and "synthetic" in tree
        else AnomalyDetectionPipeline
    )
    return kind.load_files(folder, device, registry)


class EnsemblePipeline(Detector):
    """Several members (pipelines or synthetic-anomaly detectors) scored together on the input's grid."""

    def __init__(self, config: EnsembleConfig, device: str | None = None, registry: Any = None) -> None:
        self.config = config
        self.registry = registry
        self.members = [_member(m, device, registry) for m in config.members]

    @property
    def foreground_method(self) -> str:
        return self.members[0].foreground_method

    def fit(
        self,
        volumes: Sequence[VolumeLike],
        val_volumes: Sequence[VolumeLike] | None = None,
        callbacks: Sequence[EpochCallback] = (),
        show_progress: bool | None = None,
    ) -> EnsemblePipeline:
        t0 = time.perf_counter()
        with last_calibration_warns():  # the members' own calibrations are not the ensemble's
            for member in self.members:
                member.fit(volumes, val_volumes, callbacks=callbacks, show_progress=show_progress)
            first = self.members[0]
            self.failures_ = first.failures_
            self.history_ = first.history_
            self.n_train_volumes_, self.n_val_volumes_ = first.n_train_volumes_, first.n_val_volumes_
            self.val_volumes_ = first.val_volumes_  # calibrated on the first member's held-out normals
            self.postprocessor_ = PostProcessor(self.config.threshold, self.registry)
            self.calibrate(self.val_volumes_)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    @property
    def channels(self) -> list[str]:
        return self.members[0].channels

    @property
    def is_ensemble(self) -> bool:
        return True

    def reference(self) -> Detector:
        return self.members[0]

    def read(self, path: Any) -> Volume:
        return self.members[0].read(path)

    def read_file(self, path: str | Path) -> Volume:
        return self.members[0].read_file(path)

    def set_reading(self, overrides: Sequence[str]) -> None:
        for member in self.members:
            member.set_reading(overrides)

    def prepare(self, item: VolumeLike) -> Prepared:
        """The ensemble works on the input's own grid (a subject's sequences on the reference grid);
        each member prepares the scan its own way."""
        volume = self.read(item) if isinstance(item, str | Path | Subject | Mapping) else as_volume(item)
        volume, _ = align(volume, self.members[0].config.data.coregister)
        return native_prepared(volume, self.foreground_method)

    def score_prepared(self, prep: Prepared) -> np.ndarray:
        combined, _ = combine_members(prep.source, self.members, self.config.combine)
        combined[~prep.mask] = 0.0
        return combined

    def example_volume(self) -> Volume | None:
        return self.members[0].example_volume()

    def save_files(self, path: str | Path) -> Path:
        self._check_fitted("save")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(self.members):
            member.save_files(out / "members" / f"{i:02d}")
        meta = {
            "combine": self.config.combine,
            "threshold_config": self.config.threshold.model_dump(mode="json"),
            "n_members": len(self.members),
        }
        (out / ENSEMBLE_FILE).write_text(json.dumps(meta, indent=2))
        self.postprocessor_.save(out)
        return out

    @classmethod
    def load_files(
        cls, path: str | Path, device: str | None = None, registry: Any = None
    ) -> EnsemblePipeline:
        folder = Path(path)
        if not (folder / ENSEMBLE_FILE).is_file():
            raise Anomaly3DError(f"{folder}: not a saved anomaly3d ensemble (missing {ENSEMBLE_FILE})")
        meta = json.loads((folder / ENSEMBLE_FILE).read_text())
        members = [
            _load_member(folder / "members" / f"{i:02d}", device, registry) for i in range(meta["n_members"])
        ]
        config = EnsembleConfig(
            combine=meta["combine"],
            members=[m.config for m in members],
            threshold=ThresholdConfig(**meta["threshold_config"]),
        )
        ens = cls.__new__(cls)
        ens.config, ens.registry, ens.members = config, registry, members
        ens.postprocessor_, _ = PostProcessor.load(folder, config.threshold, registry)
        return ens

    def plugin_specs(self) -> list[tuple[str, str]]:
        """The config's plugins, and the loaders that read each member's training scans."""
        specs = self.config.plugin_specs()
        for member in self.members:
            specs += [spec for spec in member.plugin_specs() if spec not in specs]
        return specs
