"""Conformance checks of preprocessing steps: a step's output, its record, and the way back."""

from __future__ import annotations

import json

import numpy as np

from anomaly3d_core.checks_common import _check, _ensure, _example_params
from anomaly3d_core.config_data import PreprocessingConfig
from anomaly3d_core.interfaces import PreprocessingStep, StepState
from anomaly3d_core.io.volume import Volume


def _scan(channels: int = 1) -> tuple[Volume, np.ndarray]:
    """A small head-like scan on an oblique, anisotropic, non-RAS grid, and a label mask on it."""
    shape = (26, 30, 18)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.7
    rng = np.random.default_rng(0)
    layers = [np.where(inside, 100 + (10 + 5 * c) * rng.standard_normal(shape), 0) for c in range(channels)]
    array = (layers[0] if channels == 1 else np.stack(layers, axis=-1)).astype(np.float32)
    theta = np.deg2rad(17.0)
    affine = np.eye(4)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ np.diag([-1.2, 0.9, -2.5])
    return Volume(array, affine, "check.nii.gz"), (sum(g**2 for g in grid) < 0.1)


def _chain(step: PreprocessingStep) -> list[PreprocessingStep]:
    """The default built-in chain with ``step`` after ``resample``."""
    from anomaly3d_core.preprocess.preprocessing import build_chain

    chain = build_chain(PreprocessingConfig(target_spacing=(2.0, 2.0, 2.0)))
    at = next(i for i, s in enumerate(chain) if s.name == "resample") + 1
    return [*chain[:at], step, *chain[at:]]


def _run(cls: type, step: PreprocessingStep, state: StepState) -> StepState:
    check = "check_step_call"
    out = step(state)
    _ensure(
        isinstance(out, StepState) and len(out.records) == len(state.records) + 1,
        cls,
        check,
        "__call__ must return the next StepState with one record appended: return state.evolve(self, record, ...)",
    )
    entry = out.records[-1]
    _ensure(
        entry["name"] == cls.name, cls, check, f"the record appended is '{entry['name']}', not this step's"
    )
    try:
        again = json.loads(json.dumps(entry))
    except (TypeError, ValueError) as exc:
        again = {"error": str(exc)}
    _ensure(
        again == entry,
        cls,
        check,
        f"its record must hold JSON values only (lists, numbers, strings): {again}",
    )
    grid = out.array.shape[:3]
    _ensure(out.array.ndim == state.array.ndim, cls, check, "the array must keep its channels (channel-last)")
    _ensure(np.isfinite(out.array).all(), cls, check, "the array has non-finite values")
    for what in ("foreground", "mask"):
        value = getattr(out, what)
        _ensure(
            value is None or tuple(value.shape) == grid,
            cls,
            check,
            f"the {what} is on a {tuple(value.shape) if value is not None else ''} grid, the array on {grid}: "
            "a step that changes the grid changes every array of the state",
        )
    _ensure(np.asarray(out.affine).shape == (4, 4), cls, check, "the affine must be 4x4")
    return out


@_check
def check_step_call(cls: type) -> None:
    """The step runs on one and on two sequences, returns a consistent state with a JSON record, and does
    the same twice."""
    step = cls(_example_params(cls))
    for channels in (1, 2):
        volume, mask = _scan(channels)
        state = StepState(volume.array, volume.affine, volume, mask)
        for before in _chain(step)[: _chain(step).index(step)]:
            state = before(state)
        first, second = _run(cls, step, state), _run(cls, step, state)
        _ensure(
            np.array_equal(first.array, second.array) and first.records == second.records,
            cls,
            "check_step_call",
            "two calls on the same state differ; a step must be deterministic",
        )


@_check
def check_step_invert(cls: type) -> None:
    """Called then inverted, a map returns to the grid the step was given, from the record alone (a step
    built again from the entry's arguments); and through the whole default chain, to the scan's own grid."""
    check = "check_step_invert"
    step = cls(_example_params(cls))
    volume, mask = _scan()
    state = StepState(volume.array, volume.affine, volume, mask)
    states = [state]
    for s in _chain(step):
        states.append(s(states[-1]))
    i = _chain(step).index(step)
    before, after = states[i], states[i + 1]
    entry = after.records[-1]
    rebuilt = cls(entry["args"])
    scores = np.random.default_rng(1).random(after.array.shape[:3]).astype(np.float32)
    for order in (0, 1):
        back = rebuilt.invert(scores, entry["record"], order, 0.0)
        _ensure(
            tuple(np.shape(back)) == tuple(before.array.shape[:3]),
            cls,
            check,
            f"invert(order={order}) gives a {tuple(np.shape(back))} grid, the step was given {before.array.shape[:3]}",
        )
        _ensure(np.isfinite(back).all(), cls, check, f"invert(order={order}) gives non-finite values")
    arr = states[-1].array
    for s, e in zip(reversed(_chain(step)), reversed(states[-1].records), strict=True):
        arr = (rebuilt if s is step else s).invert(np.asarray(arr, np.float32), e["record"], 0, 0.0)
    _ensure(
        tuple(arr.shape) == volume.shape,
        cls,
        check,
        f"the chain with this step inverts to a {tuple(arr.shape)} grid, not the scan's {volume.shape}",
    )


@_check
def check_step_grid(cls: type) -> None:
    """``grid`` gives a 3-voxel-axis shape and a 4x4 affine from a header alone."""
    step = cls(_example_params(cls))
    volume, _ = _scan()
    shape, affine = step.grid(volume.shape, volume.affine)
    _ensure(
        len(tuple(shape)) == 3 and all(int(s) >= 1 for s in shape) and np.asarray(affine).shape == (4, 4),
        cls,
        "check_step_grid",
        f"grid(shape, affine) must return ((X, Y, Z), 4x4 affine), got {shape!r}",
    )
