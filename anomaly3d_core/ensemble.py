"""Ensembles: several pipelines whose scores, each normalised against its own normal-validation
statistics, are combined voxel by voxel (mean or max) on the input's grid.

A YAML config with a top-level ``ensemble`` section builds one::

    ensemble:
      combine: mean
      members:
        - {extractor: {type: identity}, autoencoder: {type: standard}}
        - experiments/configs/brain_mri.yaml        # a path works too
      threshold: {type: percentile, args: {percentile: 99.5}}
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

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
from anomaly3d_core.errors import Anomaly3DError, ConfigError
from anomaly3d_core.io.data import VolumeLike, as_volume
from anomaly3d_core.pipeline import AnomalyDetectionPipeline, Calibrated, ScoreResult
from anomaly3d_core.postprocess import thresholding
from anomaly3d_core.preprocess.preprocessing import Preprocessor, foreground_mask

ENSEMBLE_FILE = "ensemble.json"


class EnsembleConfig(Section):
    combine: Literal["mean", "max"] = "mean"
    members: list[PipelineConfig] = Field(min_length=2)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def flat(self) -> dict[str, Any]:
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump({"ensemble": self.model_dump(mode="json")}, sort_keys=False)

    def plugin_specs(self) -> list[tuple[str, str]]:
        specs = [("thresholds", self.threshold.type), ("thresholds", self.threshold.volume.method.type)]
        for m in self.members:
            specs += [("extractors", m.extractor.type), ("autoencoders", m.autoencoder.type)]
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
                m = yaml.safe_load(path.read_text()) or {}
            out.append(m)
        return out


def build_ensemble_config(
    tree: Mapping[str, Any], overrides: Sequence[str] = (), registry: Any = None
) -> EnsembleConfig:
    """Validate an ``ensemble`` section; ``--set`` overrides apply to every member."""
    try:
        cfg = EnsembleConfig.model_validate(dict(tree))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, EnsembleConfig, prefix="ensemble.")) from None
    members = []
    for i, member in enumerate(cfg.members):
        try:
            members.append(
                build_config(apply_overrides(member.model_dump(mode="json"), overrides), registry=registry)
            )
        except ConfigError as exc:
            raise ConfigError(f"ensemble.members.{i}: {exc}") from None
    cfg.members = members
    thresholds = PipelineConfig(threshold=cfg.threshold)
    validate_plugins(thresholds, registry)
    return cfg


class EnsemblePipeline(Calibrated):
    """Several :class:`AnomalyDetectionPipeline` members scored together."""

    def __init__(self, config: EnsembleConfig, device: str | None = None, registry: Any = None) -> None:
        self.config = config
        self.registry = registry
        self.members = [AnomalyDetectionPipeline(m, device=device, registry=registry) for m in config.members]

    def fit(
        self, volumes: Sequence[VolumeLike], val_volumes: Sequence[VolumeLike] | None = None, **kwargs: Any
    ) -> EnsemblePipeline:
        t0 = time.perf_counter()
        for member in self.members:
            member.fit(volumes, val_volumes, **kwargs)
        first = self.members[0]
        self.failures_ = first.failures_
        self.history_ = first.history_
        self.n_train_volumes_, self.n_val_volumes_ = first.n_train_volumes_, first.n_val_volumes_
        self.calibrate(first.val_volumes_)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def read(self, path: str | Path) -> Any:
        return self.members[0].read(path)

    def _combined(self, volume: Any) -> tuple[np.ndarray, np.ndarray]:
        maps = []
        for member in self.members:
            prep = member.prepare(volume)
            z = np.maximum(
                member.normalized(member._prepared_scores(prep)), 0.0
            )  # only above-normal evidence
            z[~prep.mask] = 0.0
            maps.append(Preprocessor.invert(z, prep.record, order=1))
        combined = np.mean(maps, axis=0) if self.config.combine == "mean" else np.max(maps, axis=0)
        fg = foreground_mask(volume.array, self.members[0].config.data.preprocessing.foreground)
        combined[~fg] = 0.0
        return combined.astype(np.float32), fg

    def calibrate(self, normal: Sequence[VolumeLike]) -> EnsemblePipeline:
        maps = [self._combined(as_volume(v)) for v in normal]
        state = thresholding.calibrate(
            [m for m, _ in maps], [fg for _, fg in maps], self.config.threshold, self.registry
        )
        self._set_calibration(state)
        return self

    def score(self, item: VolumeLike) -> ScoreResult:
        t0 = time.perf_counter()
        volume = as_volume(item)
        scores, fg = self._combined(volume)
        threshold, mask, vscore = thresholding.decide(
            scores, fg, volume.spacing, self.config.threshold, self.threshold_, self.registry
        )
        return ScoreResult(
            volume,
            scores,
            mask,
            vscore,
            bool(vscore > self.volume_threshold_),
            threshold,
            seconds=time.perf_counter() - t0,
            foreground=fg,
        )

    def score_map(self, item: VolumeLike) -> tuple[np.ndarray, dict[str, Any]]:
        r = self.score(item)
        return r.score_map, {
            "volume_score": r.volume_score,
            "is_anomalous": r.is_anomalous,
            "threshold": r.threshold,
        }

    def predict(self, item: VolumeLike) -> np.ndarray:
        return self.score(item).mask

    def save_files(self, path: str | Path) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(self.members):
            member.save_files(out / "members" / f"{i:02d}")
        state = {
            "combine": self.config.combine,
            "threshold_config": self.config.threshold.model_dump(mode="json"),
            "threshold": self.threshold_,
            "volume_threshold": self.volume_threshold_,
            "score_stats": self.score_stats_,
            "normal_volume_scores": self.normal_volume_scores_,
            "n_members": len(self.members),
        }
        (out / ENSEMBLE_FILE).write_text(json.dumps(state, indent=2))
        return out

    def save(self, path: str | Path) -> Path:
        from anomaly3d_core.mlops.serving import save_pyfunc

        return save_pyfunc(self, path)

    @classmethod
    def load_files(
        cls, path: str | Path, device: str | None = None, registry: Any = None
    ) -> EnsemblePipeline:
        folder = Path(path)
        state = json.loads((folder / ENSEMBLE_FILE).read_text())
        members = [
            AnomalyDetectionPipeline.load_files(folder / "members" / f"{i:02d}", device, registry)
            for i in range(state["n_members"])
        ]
        config = EnsembleConfig(
            combine=state["combine"],
            members=[m.config for m in members],
            threshold=ThresholdConfig(**state["threshold_config"]),
        )
        ens = cls.__new__(cls)
        ens.config, ens.registry, ens.members = config, registry, members
        ens._set_calibration(state)
        return ens

    def plugin_specs(self) -> list[tuple[str, str]]:
        return self.config.plugin_specs()


def load_model(
    path: str | Path, device: str | None = None, registry: Any = None
) -> AnomalyDetectionPipeline | EnsemblePipeline:
    """Load a saved pipeline or ensemble (MLflow model folder or plain folder)."""
    folder = Path(path)
    if not folder.exists():
        raise Anomaly3DError(f"{folder}: model folder not found")
    inner = folder / "artifacts" / "pipeline" if (folder / "MLmodel").is_file() else folder
    if (inner / ENSEMBLE_FILE).is_file():
        return EnsemblePipeline.load_files(inner, device, registry)
    return AnomalyDetectionPipeline.load_files(inner, device, registry)


def load_any_config(
    path: str | Path | None, overrides: Sequence[str] = (), registry: Any = None
) -> PipelineConfig | EnsembleConfig:
    """A pipeline config, or an ensemble config when the YAML has a top-level ``ensemble`` section."""
    from anomaly3d_core.config import load_config

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
