"""The data sections of the config (how scans are read, preprocessed and augmented) and the
:class:`Section` base every section shares; :mod:`anomaly3d_core.config` composes them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Triple = tuple[int, int, int]


def _triple(value: Any) -> Any:
    """Accept ``8`` as ``(8, 8, 8)``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (int(value),) * 3
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


#: The built-in steps in chain order (``anomaly3d_core.preprocess.steps``): where an extra step can go.
BUILTIN_STEP_NAMES = ("register", "reorient", "resample", "foreground", "normalize", "crop", "pad")


class StepSpec(Section):
    """An extra preprocessing step: a registered ``steps`` plugin, its ``args``, and the built-in step
    it runs after."""

    type: str
    args: dict[str, Any] = Field(default_factory=dict)
    after: Literal[BUILTIN_STEP_NAMES] = Field(  # type: ignore[valid-type]
        "resample", description="the built-in step this one follows (several after one: in the order listed)"
    )


class PreprocessingConfig(Section):
    reorient: bool = True
    target_spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    target_shape: Triple | None = None
    foreground: Literal["nonzero", "otsu", "none"] = "nonzero"
    crop_foreground: bool = True
    crop_margin: int = Field(4, ge=0)
    pad_multiple: int = Field(8, ge=1)
    normalize_method: Literal["z_score", "min_max", "percentile", "none"] = "z_score"
    clip_percentile: tuple[float, float] | None = (0.5, 99.5)
    register_to: Literal["none", "auto", "mni152"] = Field(
        "none",
        description="affine registration to a template before everything else (brain MRI: mni152); "
        "auto registers each scan to MNI152 unless it already lies in MNI152 space",
    )
    deformable: bool = Field(
        False,
        description="after the affine registration, a coarse deformable step (BSpline, Mattes MI at 4 mm, "
        "control points every 32 mm) aligns each scan's anatomy closer to the template; maps still come "
        "back on each scan's own grid through its inverse",
    )

    steps: list[StepSpec] = Field(
        default_factory=list,
        description="extra steps from plugins ({type, args, after}), chained after the built-in step named "
        "by after; the built-ins run in the order of BUILTIN_STEP_NAMES, set by the keys above",
    )

    _triple = field_validator("target_shape", mode="before")(_triple)

    @model_validator(mode="after")
    def _deformable_needs_registration(self) -> PreprocessingConfig:
        if self.deformable and self.register_to == "none":
            raise ValueError(
                "deformable: the deformable step follows the affine registration; set register_to "
                "(auto or mni152) or leave deformable out"
            )
        return self

    @field_validator("target_spacing", mode="before")
    @classmethod
    def _spacing(cls, v: Any) -> Any:
        return (float(v),) * 3 if isinstance(v, int | float) and not isinstance(v, bool) else v


class AugmentationConfig(Section):
    enabled: bool = False
    rotation_range: float = 10.0
    flip_probability: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.01, ge=0)
    brightness_range: float = Field(0.1, ge=0)
    contrast_range: float = Field(0.1, ge=0)
    gamma_range: float = Field(0.1, ge=0)
    bias_field_strength: float = Field(0.0, ge=0)
    elastic_strength: float = Field(0.0, ge=0)
    copies: int = Field(1, ge=1)
    seed: int = 0


class DataConfig(Section):
    loader: str = "auto"
    loader_args: dict[str, Any] = Field(
        default_factory=dict, description="the loader's parameters, e.g. {series_uid: ...} for dicom"
    )
    cache: bool = Field(True, description="cache preprocessed volumes on disk (see anomaly3d_core.io.cache)")
    sequences: list[str] | None = Field(
        None,
        description="the sequences of a subject, as BIDS suffixes (e.g. [T1w, FLAIR]), one input channel "
        "each; none: one file per subject",
    )
    reference_sequence: str | None = Field(
        None, description="the sequence whose grid the others are resampled onto (default: the first)"
    )
    coregister: bool | Literal["auto"] = Field(
        "auto",
        description="rigidly co-register each sequence to the reference (mutual information); auto: unless "
        "it lies on the reference's grid already (sequences aligned beforehand)",
    )
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)

    @field_validator("sequences")
    @classmethod
    def _sequences(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("sequences: give at least one name (e.g. [T1w, FLAIR]) or leave it out")
        bad = [s for s in v if not s.isalnum()]
        if bad:
            raise ValueError(
                f"sequences: '{bad[0]}' is not a BIDS suffix (letters and digits only, e.g. T2w)"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"sequences: {v} names a sequence twice")
        return list(v)

    @model_validator(mode="after")
    def _reference(self) -> DataConfig:
        if self.reference_sequence is not None:
            names = self.sequences or []
            if self.reference_sequence not in names:
                raise ValueError(
                    f"reference_sequence: '{self.reference_sequence}' is not one of sequences {names}"
                )
        return self

    def plugin_specs(self) -> list[tuple[str, str]]:
        """``(family, name)`` of the plugins reading and preprocessing name: a named loader, extra steps."""
        specs = [("loaders", self.loader)] if self.loader != "auto" else []
        return specs + [("steps", step.type) for step in self.preprocessing.steps]

    @property
    def channels(self) -> list[str]:
        """The sequences in channel order: the reference first, then the others as listed."""
        if not self.sequences:
            return []
        ref = self.reference_sequence or self.sequences[0]
        return [ref, *[s for s in self.sequences if s != ref]]
