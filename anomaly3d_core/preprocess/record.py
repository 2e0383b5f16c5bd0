"""The record of what preprocessing did to one scan: one entry per step of the chain, in order.

Each entry is ``{"name": step, "args": its parameters, "record": what its invert needs}`` in JSON
values, so a record survives the preprocessing cache. Records written before the chain (one flat
set of fields: ``to_canonical``, ``crop_start``, ...) are translated by :meth:`PreprocessRecord.from_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

IDENTITY = [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
QUALITY = ("registration_dice", "registration_metric", "registration_displacement_mm")


@dataclass
class PreprocessRecord:
    """What :meth:`~anomaly3d_core.preprocess.preprocessing.Preprocessor.invert` needs to go back to
    the scan's grid: the scan's own grid and each step's record."""

    original_shape: tuple[int, int, int]
    original_affine: list[list[float]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: Finds the step object of an entry (set by the Preprocessor that made or adopted the record; not saved).
    resolver: ClassVar[Callable[[dict[str, Any]], Any] | None] = None

    def entry(self, name: str) -> dict[str, Any]:
        """The record of the first step called ``name`` (empty when the chain has none)."""
        return next((dict(e["record"]) for e in self.steps if e["name"] == name), {})

    # the registration's outcome, read by reports, tracking and the detector
    @property
    def registration(self) -> list[float] | None:
        """The template -> scan affine transform, when the scan was registered."""
        return self.entry("register").get("registration")

    @property
    def reference_affine(self) -> list[list[float]] | None:
        return self.entry("register").get("reference_affine")

    @property
    def deformation(self) -> list[float] | None:
        """The deformable step after the affine, when fitted."""
        return self.entry("register").get("deformation")

    @property
    def registration_dice(self) -> float | None:
        """Fit quality, see ``registration.registration_quality``."""
        return self.entry("register").get("registration_dice")

    @property
    def registration_metric(self) -> float | None:
        return self.entry("register").get("registration_metric")

    @property
    def registration_displacement_mm(self) -> float | None:
        """The deformable step's mean displacement in the template's brain."""
        return self.entry("register").get("registration_displacement_mm")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessRecord:
        """Inverse of :meth:`to_dict` after a JSON round trip; a flat record of before the chain is translated."""
        steps = data["steps"] if "steps" in data else legacy_steps(data)
        return cls(tuple(int(s) for s in data["original_shape"]), data["original_affine"], list(steps))  # type: ignore[arg-type]


def legacy_steps(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chain's entries equivalent to a flat record (``original_shape``, ``to_canonical``, ``crop_start``, ...)."""
    shape, affine = [int(s) for s in data["original_shape"]], data["original_affine"]
    register: dict[str, Any] = {}
    if data.get("registration") is not None:
        register = {
            "shape_in": shape,
            "affine_in": affine,
            "registration": data["registration"],
            "reference_affine": data["reference_affine"],
            "deformation": data.get("deformation"),
            **{k: data[k] for k in QUALITY if data.get(k) is not None},
        }
    reorient: dict[str, Any] = {"transform": [[float(v) for v in row] for row in data["to_canonical"]]}
    if reorient["transform"] != IDENTITY:
        reorient["affine_in"] = affine
    resampled = [int(s) for s in data["resampled_shape"]]
    records = {
        "register": register,
        "reorient": reorient,
        "resample": {"shape_in": [int(s) for s in data["canonical_shape"]], "shape_out": resampled},
        "foreground": {},
        "normalize": {},
        "crop": {"start": list(data["crop_start"]), "stop": list(data["crop_stop"]), "shape_in": resampled},
        "pad": {"before": list(data["pad_before"]), "after": list(data["pad_after"])},
    }
    return [{"name": name, "args": {}, "record": record} for name, record in records.items()]
