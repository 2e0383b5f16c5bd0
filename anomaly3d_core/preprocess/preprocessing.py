"""Preprocessing as a chain of invertible steps, so results map back to the input's grid.

The chain, built from ``data.preprocessing`` and ``data.coregister`` (:func:`build_chain`): put a
subject's sequences on the reference sequence's grid (co-register) -> register to a template ->
reorient to RAS+ -> resample (spacing or shape) -> foreground mask -> normalise inside the
foreground -> crop to the foreground (+ margin) -> pad to a multiple the network needs; plugin
steps (``data.preprocessing.steps``) go after the built-in step they name. Each step
(:mod:`~anomaly3d_core.preprocess.steps`) records what it did; :meth:`Preprocessor.invert` walks
the records backwards. The limits (:meth:`Preprocessor.working_grid`) and the cache key
(:meth:`Preprocessor.key`) come from the same chain.

A subject with several sequences (read each on its own grid, see
:mod:`~anomaly3d_core.preprocess.sequences`) has them stacked on the reference grid as a channel
axis last by the first step; the steps after it treat them alike: registration and the
foreground come from the reference sequence, every sequence is normalised on its own, and the
prepared array has the channels first, ``(C, X, Y, Z)``, as the network takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from anomaly3d_core.config import PreprocessingConfig
from anomaly3d_core.errors import DataError, PluginError
from anomaly3d_core.interfaces import PreprocessingStep, StepState
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.ops import foreground_mask, normalize, resize, resized_affine
from anomaly3d_core.preprocess.record import PreprocessRecord
from anomaly3d_core.preprocess.steps import (
    BUILTIN_STEPS,
    Coregister,
    Crop,
    Foreground,
    Normalize,
    Pad,
    Register,
    Reorient,
    Resample,
)

__all__ = [
    "Prepared",
    "PreprocessRecord",
    "Preprocessor",
    "build_chain",
    "foreground_mask",
    "normalize",
    "resize",
    "resized_affine",
]
_BUILTIN = {cls.name: cls for cls in BUILTIN_STEPS}


@dataclass
class Prepared:
    """A preprocessed volume: network-ready array (``(X, Y, Z)``, or ``(C, X, Y, Z)`` for several
    sequences), foreground mask, grid affine and the record."""

    array: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    record: PreprocessRecord
    source: Volume

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial grid (without the channel axis)."""
        return tuple(int(s) for s in self.mask.shape)  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self.array.shape[0]) if self.array.ndim == 4 else 1


def _registry(registry: Any) -> Any:
    if registry is None:
        from anomaly3d_core.registry import get_registry

        registry = get_registry()
    return registry


def build_chain(
    config: PreprocessingConfig, registry: Any = None, coregister: bool | str = "auto"
) -> list[PreprocessingStep]:
    """The steps ``config`` asks for, in order: the built-ins, each followed by the extra steps that
    name it in ``after`` (looked up in the ``steps`` family of ``registry``). ``coregister`` is
    ``data.coregister``, the first step's setting (it reads the data's sequences, not the grid)."""
    c = config
    builtins: list[PreprocessingStep] = [
        Coregister(coregister=coregister),
        Register(register_to=c.register_to, deformable=c.deformable),
        Reorient(enabled=c.reorient),
        Resample(target_spacing=c.target_spacing, target_shape=c.target_shape),
        Foreground(method=c.foreground),
        Normalize(method=c.normalize_method, clip_percentile=c.clip_percentile),
        Crop(enabled=c.crop_foreground, margin=c.crop_margin),
        Pad(multiple=c.pad_multiple, normalized=c.normalize_method != "none"),
    ]
    chain: list[PreprocessingStep] = []
    for step in builtins:
        chain.append(step)
        for spec in c.steps:
            if spec.after == step.name:
                chain.append(_registry(registry).get("steps", spec.type)(spec.args))
    return chain


def _step_for(entry: dict[str, Any], registry: Any = None) -> PreprocessingStep:
    """The step that wrote a record entry, built again from its name and arguments."""
    name = entry["name"]
    cls = _BUILTIN.get(name) or _registry(registry).get("steps", name)
    return cls(entry.get("args") or {})


class Preprocessor:
    """Applies a :class:`PreprocessingConfig` to volumes as a chain of steps and inverts it on score maps."""

    def __init__(
        self, config: PreprocessingConfig | None = None, registry: Any = None, coregister: bool | str = "auto"
    ) -> None:
        self.config = config or PreprocessingConfig()
        self.registry = registry
        self.coregister = coregister
        self._built: tuple[str, list[PreprocessingStep]] | None = None

    @property
    def steps(self) -> list[PreprocessingStep]:
        """The chain for the current config (rebuilt when the config changes)."""
        stamp = self.config.model_dump_json()  # ``coregister`` is set once, at construction
        if self._built is None or self._built[0] != stamp:
            self._built = (stamp, build_chain(self.config, self.registry, self.coregister))
        return self._built[1]

    def key(self) -> list[dict[str, Any]]:
        """What identifies the chain's output: each step's name, version and parameters (the cache key)."""
        return [step.key() for step in self.steps]

    def working_grid(self, shape: tuple[int, int, int], affine: np.ndarray) -> tuple[int, int, int]:
        """The grid a scan of ``shape``/``affine`` is resampled to, from its header alone (for the limits).

        Cropping only shrinks it and padding rounds the cropped grid up, so this bounds what is allocated.
        """
        for step in self.steps:
            shape, affine = step.grid(tuple(int(s) for s in shape), np.asarray(affine, dtype=np.float64))  # type: ignore[assignment]
        return tuple(int(s) for s in shape)  # type: ignore[return-value]

    def step_for(self, entry: dict[str, Any]) -> PreprocessingStep:
        """The step that wrote a record entry: this chain's own instance, else one built again by name."""
        for step in self.steps:
            if step.name == entry["name"] and step.params.model_dump(mode="json") == entry.get("args"):
                return step
        return _step_for(entry, self.registry)

    def adopt(self, prepared: Prepared) -> Prepared:
        """Let ``prepared``'s record (e.g. read back from the cache) invert through this chain's steps."""
        prepared.record.resolver = self.step_for
        return prepared

    def registration_target(self, volume: Volume) -> str | None:
        """The template this scan is registered to, if any (``auto``: unless it is in MNI152 space already)."""
        return Register(register_to=self.config.register_to).target(volume.shape, volume.affine)

    def __call__(self, volume: Volume, mask: np.ndarray | None = None) -> Prepared:
        """Preprocess ``volume``; an optional ``mask`` (e.g. ground truth) is carried along on the same grid."""
        if mask is not None and tuple(mask.shape) != tuple(volume.shape):
            raise DataError(
                volume.path, f"mask grid {tuple(mask.shape)} differs from the scan's {tuple(volume.shape)}"
            )
        state = StepState(np.asarray(volume.array, dtype=np.float32), volume.affine, volume, mask)
        for step in self.steps:
            out = step(state)
            if not isinstance(out, StepState) or len(out.records) != len(state.records) + 1:
                raise PluginError(
                    f"preprocessing step '{step.name}' ({type(step).__module__}) must return the next "
                    "StepState with its record appended: return state.evolve(self, record, **changes)"
                )
            state = out
        fg = state.foreground if state.foreground is not None else np.ones(state.array.shape[:3], dtype=bool)
        record = PreprocessRecord(
            tuple(int(s) for s in volume.shape),  # type: ignore[arg-type]
            volume.affine.tolist(),
            [dict(e) for e in state.records],
        )
        arr = np.moveaxis(state.array, -1, 0) if state.array.ndim == 4 else state.array
        # the source: the scan as read, its sequences on the reference grid (``coregister`` stacks them)
        source = state.volume
        prepared = Prepared(np.ascontiguousarray(arr, dtype=np.float32), fg, state.affine, record, source)
        prepared.target = state.mask  # type: ignore[attr-defined]
        return self.adopt(prepared)

    @staticmethod
    def invert(
        array: np.ndarray, record: PreprocessRecord, order: int = 1, fill: float = 0.0, registry: Any = None
    ) -> np.ndarray:
        """Map an array on the preprocessed grid back onto the original scan's grid, step by step backwards.

        Each entry's step is the one that made the record (:meth:`adopt`), else the built-in or the
        ``registry``'s (default: the installed plugins) step of that name."""
        arr = np.asarray(array, dtype=np.float32)
        resolve = record.resolver or (lambda entry: _step_for(entry, registry))
        for entry in reversed(record.steps):
            arr = resolve(entry).invert(arr, entry["record"], order, fill)
        assert tuple(arr.shape) == tuple(record.original_shape), (arr.shape, record.original_shape)
        return np.ascontiguousarray(arr)
