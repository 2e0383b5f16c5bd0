"""The built-in preprocessing steps, in the order the chain runs them.

``coregister`` -> ``register`` -> ``reorient`` -> ``resample`` -> ``foreground`` -> ``normalize`` -> ``crop`` -> ``pad``:
each a :class:`~anomaly3d_core.interfaces.PreprocessingStep` whose parameters are the matching
``data.preprocessing`` keys (:func:`anomaly3d_core.preprocess.chain.build_chain` makes them from the
config), whose record says how to undo it, and whose :meth:`invert` maps a score map back one grid.
They are registered in the ``steps`` family like any plugin's step (``plugins/steps``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from nibabel import orientations as ornt
from pydantic import Field

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import Params, PreprocessingStep, StepState
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess import registration as registration_module
from anomaly3d_core.preprocess import sequences as sequences_module
from anomaly3d_core.preprocess.ops import each_channel, foreground_mask, normalize, resize, resized_affine
from anomaly3d_core.preprocess.record import IDENTITY
from anomaly3d_core.preprocess.survey import in_template_space

Shape = tuple[int, int, int]


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


class CoregisterParams(Params):
    coregister: bool | Literal["auto"] = Field(
        "auto", description="rigid fit of each sequence to the reference; auto: unless on its grid already"
    )


class Coregister(PreprocessingStep):
    """A subject's sequences, read each on its own grid, co-registered and resampled onto the reference
    sequence's grid and stacked as channels (:func:`~anomaly3d_core.preprocess.sequences.align`); a scan
    already on one grid passes as it is. The record holds each sequence's rigid fit (``transform``) and
    its size (``rotation_deg``, ``shift_mm``).

    :meth:`invert` is the identity: the reference sequence never moves, and a score map is on the
    reference sequence's grid, which is the grid this step starts from and ends on."""

    name = "coregister"
    Params = CoregisterParams

    def __call__(self, state: StepState) -> StepState:
        stacked, fits = sequences_module.align(state.volume, self.params.coregister)
        if stacked is state.volume:
            return state.evolve(self)
        record = {"sequences": list(stacked.meta["sequences"]), "coregistration": fits}
        return state.evolve(self, record, array=np.asarray(stacked.array, dtype=np.float32), volume=stacked)


class RegisterParams(Params):
    register_to: Literal["none", "auto", "mni152"] = "none"
    deformable: bool = False


class Register(PreprocessingStep):
    """Affine (and optionally deformable) registration of the reference sequence to a template; the
    other sequences and the carried mask follow its transform. Undone by resampling onto the scan's grid."""

    name = "register"
    Params = RegisterParams

    def target(self, shape: Shape, affine: np.ndarray) -> str | None:
        """The template a scan of this grid is registered to (``auto``: unless it is in MNI152 space)."""
        target = self.params.register_to
        if target == "none":
            return None
        if target == "auto":
            ref = registration_module.reference("mni152")
            return None if in_template_space(shape, affine, ref) else "mni152"
        return target

    def __call__(self, state: StepState) -> StepState:
        target = self.target(state.array.shape[:3], state.affine)
        if target is None:
            return state.evolve(self)
        ref = registration_module.reference(target)
        channels = state.channels()
        first = Volume(channels[0], state.affine, state.volume.path, state.volume.meta)
        fit = registration_module.register(first, target, deformable=self.params.deformable)
        arr, deformation = fit.array, fit.deformation
        if len(channels) > 1:
            others = [
                registration_module.apply_transform(c, state.affine, ref, fit.params, deformation=deformation)
                for c in channels[1:]
            ]
            arr = np.stack([arr, *others], axis=-1)
        mask = state.mask
        if mask is not None:
            mask = registration_module.register_mask(
                mask, state.affine, ref, fit.params, deformation=deformation
            )
        record: dict[str, Any] = {
            "shape_in": _ints(state.array.shape[:3]),
            "affine_in": np.asarray(state.affine).tolist(),
            "registration": fit.params,
            "reference_affine": ref.affine.tolist(),
            "deformation": deformation,
            **fit.quality,
        }
        if deformation is not None:
            record["registration_displacement_mm"] = fit.displacement_mm
        return state.evolve(self, record, array=arr, affine=ref.affine.copy(), mask=mask, space=target)

    def invert(
        self, array: np.ndarray, record: Mapping[str, Any], order: int = 1, fill: float = 0.0
    ) -> np.ndarray:
        if not record.get("registration"):
            return array
        return registration_module.to_native(
            array,
            np.asarray(record["reference_affine"]),
            record["registration"],
            tuple(record["shape_in"]),
            np.asarray(record["affine_in"]),
            order,
            record.get("deformation"),
        )

    def grid(self, shape: Shape, affine: np.ndarray) -> tuple[Shape, np.ndarray]:
        target = self.target(shape, affine)
        if target is None:
            return shape, affine
        ref = registration_module.reference(target)
        return ref.shape, ref.affine


class ReorientParams(Params):
    enabled: bool = True


class Reorient(PreprocessingStep):
    """Axes in RAS+ order (a permutation and flips, no interpolation); a registered grid keeps the
    template's orientation."""

    name = "reorient"
    Params = ReorientParams

    def transform(self, affine: np.ndarray, space: str | None = None) -> np.ndarray | None:
        """The orientation transform to RAS+, or ``None`` when the axes stay as they are."""
        if not self.params.enabled or space is not None:
            return None
        transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))
        return None if np.array_equal(transform, IDENTITY) else transform

    def __call__(self, state: StepState) -> StepState:
        transform = self.transform(state.affine, state.space)
        if transform is None:
            return state.evolve(self, {"transform": IDENTITY})
        shape = state.array.shape[:3]
        mask = (
            None
            if state.mask is None
            else np.ascontiguousarray(ornt.apply_orientation(state.mask, transform))
        )
        return state.evolve(
            self,
            {"transform": np.asarray(transform).tolist(), "affine_in": np.asarray(state.affine).tolist()},
            array=np.ascontiguousarray(ornt.apply_orientation(state.array, transform)),
            affine=state.affine @ ornt.inv_ornt_aff(transform, shape),
            mask=mask,
        )

    def invert(
        self, array: np.ndarray, record: Mapping[str, Any], order: int = 1, fill: float = 0.0
    ) -> np.ndarray:
        if np.array_equal(record["transform"], IDENTITY):
            return array
        back = ornt.ornt_transform(
            ornt.axcodes2ornt("RAS"), ornt.io_orientation(np.asarray(record["affine_in"]))
        )
        return ornt.apply_orientation(array, back)

    def grid(self, shape: Shape, affine: np.ndarray) -> tuple[Shape, np.ndarray]:
        affine = np.asarray(affine, dtype=np.float64)
        if np.isnan(ornt.io_orientation(affine)).any():  # a degenerate affine: nothing to reorient by
            return shape, affine
        transform = self.transform(affine)
        if transform is None:
            return shape, affine
        new_shape = tuple(int(shape[int(i)]) for i in np.argsort(transform[:, 0]))
        return new_shape, affine @ ornt.inv_ornt_aff(transform, shape)  # type: ignore[return-value]


class ResampleParams(Params):
    target_spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    target_shape: tuple[int, int, int] | None = None


class Resample(PreprocessingStep):
    """Trilinear resampling to ``target_shape``, else to ``round(n * spacing / target_spacing)`` voxels
    per axis (at least 1); masks by nearest neighbour."""

    name = "resample"
    Params = ResampleParams

    def grid(self, shape: Shape, affine: np.ndarray) -> tuple[Shape, np.ndarray]:
        p = self.params
        if p.target_shape is not None:
            new: Shape = tuple(int(s) for s in p.target_shape)  # type: ignore[assignment]
        elif p.target_spacing is None:
            new = tuple(int(s) for s in shape)  # type: ignore[assignment]
        else:
            spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
            new = tuple(  # type: ignore[assignment]
                max(1, int(round(n * s / t)))
                for n, s, t in zip(shape, spacing, p.target_spacing, strict=True)
            )
        return new, (affine if new == tuple(shape) else resized_affine(affine, shape, new))

    def __call__(self, state: StepState) -> StepState:
        shape = tuple(int(s) for s in state.array.shape[:3])
        new, affine = self.grid(shape, state.affine)  # type: ignore[arg-type]
        record = {"shape_in": list(shape), "shape_out": list(new)}
        if new == shape:
            return state.evolve(self, record)
        mask = state.mask
        if mask is not None:
            mask = resize(mask.astype(np.float32), new, order=0) > 0.5
        array = each_channel(lambda a: resize(a, new, order=1), state.array)
        return state.evolve(self, record, array=array, affine=affine, mask=mask)

    def invert(
        self, array: np.ndarray, record: Mapping[str, Any], order: int = 1, fill: float = 0.0
    ) -> np.ndarray:
        return resize(array, tuple(record["shape_in"]), order=order)


class ForegroundParams(Params):
    method: Literal["nonzero", "otsu", "none"] = "nonzero"


class Foreground(PreprocessingStep):
    """The foreground mask of the reference sequence (the steps after it compute inside it)."""

    name = "foreground"
    Params = ForegroundParams

    def __call__(self, state: StepState) -> StepState:
        fg = foreground_mask(state.channels()[0], self.params.method)
        if not fg.any():
            raise DataError(state.volume.path, f"no foreground found with method '{self.params.method}'")
        return state.evolve(self, foreground=fg)


class NormalizeParams(Params):
    method: Literal["z_score", "min_max", "percentile", "none"] = "z_score"
    clip_percentile: tuple[float, float] | None = (0.5, 99.5)


class Normalize(PreprocessingStep):
    """Each sequence normalised with robust statistics inside the foreground (see :func:`ops.normalize`)."""

    name = "normalize"
    Params = NormalizeParams

    def __call__(self, state: StepState) -> StepState:
        fg = _foreground(state)
        p = self.params
        return state.evolve(
            self, array=each_channel(lambda a: normalize(a, fg, p.method, p.clip_percentile), state.array)
        )


def _foreground(state: StepState) -> np.ndarray:
    return state.foreground if state.foreground is not None else np.ones(state.array.shape[:3], dtype=bool)


class CropParams(Params):
    enabled: bool = True
    margin: int = Field(4, ge=0)


class Crop(PreprocessingStep):
    """Crop to the foreground's bounding box plus ``margin`` voxels; undone by filling the cut voxels."""

    name = "crop"
    Params = CropParams

    def __call__(self, state: StepState) -> StepState:
        fg = _foreground(state)
        shape = _ints(fg.shape)
        if not self.params.enabled:
            return state.evolve(self, {"start": [0, 0, 0], "stop": shape, "shape_in": shape})
        m = self.params.margin
        idx = np.argwhere(fg)
        start = [int(max(0, v - m)) for v in idx.min(axis=0)]
        stop = [int(min(s, v + 1 + m)) for v, s in zip(idx.max(axis=0), shape, strict=True)]
        sl = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        shift = np.eye(4)
        shift[:3, 3] = start
        return state.evolve(
            self,
            {"start": start, "stop": stop, "shape_in": shape},
            array=state.array[sl],
            foreground=fg[sl],
            mask=None if state.mask is None else state.mask[sl],
            affine=state.affine @ shift,
        )

    def invert(
        self, array: np.ndarray, record: Mapping[str, Any], order: int = 1, fill: float = 0.0
    ) -> np.ndarray:
        full = np.full(tuple(record["shape_in"]), fill, dtype=np.float32)
        full[tuple(slice(a, b) for a, b in zip(record["start"], record["stop"], strict=True))] = array
        return full


class PadParams(Params):
    multiple: int = Field(8, ge=1)
    normalized: bool = Field(True, description="pad with the foreground's lowest value (else 0)")


class Pad(PreprocessingStep):
    """Pad each axis (evenly on both sides) to a multiple the network needs."""

    name = "pad"
    Params = PadParams

    def __call__(self, state: StepState) -> StepState:
        size = np.array(state.array.shape[:3])
        total = (-size) % self.params.multiple
        before, after = _ints(total // 2), _ints(total - total // 2)
        record = {"before": before, "after": after}
        if not total.any():
            return state.evolve(self, record)
        widths = list(zip(before, after, strict=True))
        inside = _foreground(state)
        normalized = self.params.normalized

        def pad(a: np.ndarray) -> np.ndarray:
            return np.pad(a, widths, constant_values=float(a[inside].min()) if normalized else 0.0)

        shift = np.eye(4)
        shift[:3, 3] = -np.array(before)
        return state.evolve(
            self,
            record,
            array=each_channel(pad, state.array),
            foreground=np.pad(inside, widths),
            mask=None if state.mask is None else np.pad(state.mask, widths),
            affine=state.affine @ shift,
        )

    def invert(
        self, array: np.ndarray, record: Mapping[str, Any], order: int = 1, fill: float = 0.0
    ) -> np.ndarray:
        stop = [s - a for s, a in zip(array.shape, record["after"], strict=True)]
        return array[tuple(slice(b, e) for b, e in zip(record["before"], stop, strict=True))]


#: The built-in steps, in chain order.
BUILTIN_STEPS: tuple[type[PreprocessingStep], ...] = (
    Coregister,
    Register,
    Reorient,
    Resample,
    Foreground,
    Normalize,
    Crop,
    Pad,
)
