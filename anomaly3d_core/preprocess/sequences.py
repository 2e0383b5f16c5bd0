"""A subject's sequences: read together (:func:`read_subject`), then put on the reference grid (:func:`align`).

Reading only gathers the sequences, each on its own grid, in a :class:`SubjectScans`. The first
step of the preprocessing chain (``coregister``, :class:`~anomaly3d_core.preprocess.steps.Coregister`)
calls :func:`align`: each other sequence is checked to cover the reference scan's head, rigidly
co-registered to the reference (SimpleITK, Mattes mutual information, which compares different
contrasts; optional) and resampled onto the reference grid. The result is one :class:`Volume` with
the sequences as a last axis, reference first; each sequence is normalised on its own later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from anomaly3d_core.errors import DataError
from anomaly3d_core.io.sitk_geometry import volume_to_image
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.registration import single_threaded

log = logging.getLogger(__name__)
MIN_OVERLAP = 0.5  # fraction of the reference scan's foreground another sequence must cover
_SAMPLE_STEP = 3  # voxels between the foreground points the overlap check looks at
COREG_MM = 4.0  # voxel size co-registration works at
COREG_SAMPLES = 5000  # metric samples per iteration


@dataclass
class SubjectScans(Volume):
    """A subject's sequences as read, each on its own grid: ``sequences`` in channel order (reference
    first); ``array``, ``affine`` and ``path`` are the reference sequence's. :func:`align` stacks them."""

    sequences: dict[str, Volume] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return max(1, len(self.sequences))


def coverage(reference: Volume, other: Volume, step: int = _SAMPLE_STEP) -> float:
    """Fraction of the reference's non-zero voxels that lie inside ``other``'s field of view."""
    ref = reference.channel(0)
    idx = np.argwhere(np.abs(ref[::step, ::step, ::step]) > 0) * step
    if idx.size == 0:
        return 0.0
    world = reference.affine @ np.c_[idx, np.ones(len(idx))].T
    inside = np.linalg.solve(other.affine, world)[:3].T
    shape = np.asarray(other.shape)
    ok = np.all((inside >= -0.5) & (inside <= shape - 0.5), axis=1)
    return float(ok.mean())


def _rigid(fixed: sitk.Image, moving: sitk.Image, seed: int = 0) -> tuple[sitk.Transform, float, float]:
    """Rigid transform (fixed -> moving points) starting from the scanner's alignment; the metric before and after.

    Both images are block-averaged to about :data:`COREG_MM` first: the fit then takes a few tenths of a
    second, and head motion between sequences is found to a fraction of the working grid's voxel
    (``tests/test_sequences.py`` checks a 5.4 mm head shift on 8 mm FLAIR slices).
    """
    fixed = _coarse(fixed)
    moving = _coarse(moving)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
    start = sitk.Euler3DTransform()
    start.SetCenter(centre)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    fraction = min(1.0, COREG_SAMPLES / float(np.prod(fixed.GetSize())))
    reg.SetMetricSamplingPercentage(fraction, seed + 1)  # SimpleITK's seed 0 means the wall clock
    # gradients by central differences at the samples, not a gradient image of the whole scan
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.7
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(start, inPlace=False)
    with single_threaded():  # the fit repeats exactly
        before = float(reg.MetricEvaluate(fixed, moving))
        out = reg.Execute(fixed, moving)
        tx = out.GetNthTransform(0) if isinstance(out, sitk.CompositeTransform) else out
        reg.SetInitialTransform(tx, inPlace=False)
        after = float(reg.MetricEvaluate(fixed, moving))
    return sitk.Euler3DTransform(tx), before, after


def _coarse(image: sitk.Image) -> sitk.Image:
    """``image`` block-averaged to voxels of about :data:`COREG_MM` (thick slices are left as they are)."""
    factors = [max(1, int(round(COREG_MM / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def same_grid(a: Volume, b: Volume) -> bool:
    """Whether two volumes share shape and affine (to 1e-4 mm): sequences aligned beforehand."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=1e-4))


def onto_reference(
    other: Volume, reference: Volume, coregister: bool | str, subject: str, sequence: str
) -> tuple[np.ndarray, dict[str, float]]:
    """``other`` resampled (linear) onto the reference grid, after a rigid fit when ``coregister``
    (``"auto"``: unless ``other`` lies on the reference grid already, then it is used as it is).

    Returns the array and what the fit did (rotation in degrees, shift in mm); a fit that does not
    improve the metric over the scanner's own alignment is not used.
    """
    if coregister == "auto":
        if same_grid(other, reference):
            return np.asarray(other.array, np.float32), {"rotation_deg": 0.0, "shift_mm": 0.0}
        coregister = True
    fixed = volume_to_image(np.asarray(reference.channel(0), np.float32), reference.affine)
    moving = volume_to_image(np.asarray(other.array, np.float32), other.affine)
    tx: sitk.Transform = sitk.Euler3DTransform()
    info: dict[str, Any] = {"rotation_deg": 0.0, "shift_mm": 0.0}
    if coregister:
        try:
            fit, before, after = _rigid(fixed, moving)
        except RuntimeError as exc:
            log.warning(
                "%s: co-registering %s failed (%s); using the scanner's alignment", subject, sequence, exc
            )
        else:
            if after < before:  # Mattes MI is negative: lower is better
                tx = fit
                angles = np.degrees(np.abs(fit.GetParameters()[:3]))
                info = {
                    "rotation_deg": round(float(angles.max()), 3),
                    "shift_mm": round(float(np.linalg.norm(fit.GetParameters()[3:])), 3),
                    # the rigid transform (reference -> sequence points, SimpleITK's LPS): angles, shift, centre
                    "transform": [float(v) for v in (*fit.GetParameters(), *fit.GetFixedParameters()[:3])],
                }
    out = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.ascontiguousarray(np.transpose(sitk.GetArrayViewFromImage(out), (2, 1, 0))), info


def stack_sequences(
    volumes: dict[str, Volume],
    channels: Sequence[str],
    coregister: bool | str = "auto",
    subject: str = "subject",
) -> Volume:
    """One volume with every sequence in ``channels`` on the grid of the first (the reference).

    A sequence that covers less than :data:`MIN_OVERLAP` of the reference scan's foreground is
    refused with the subject's name: it is not the same head, or not the same part of it.
    """
    ref = volumes[channels[0]]
    if len(channels) == 1:
        ref.meta = {**ref.meta, "sequences": list(channels), "subject": subject}
        return ref
    arrays, fits = [np.asarray(ref.array, np.float32)], {}
    for seq in channels[1:]:
        other = volumes[seq]
        covered = coverage(ref, other)
        if covered < MIN_OVERLAP:
            raise DataError(
                subject,
                f"its {seq} scan covers {covered:.0%} of the {channels[0]} scan's field of view (at least "
                f"{MIN_OVERLAP:.0%} needed); are both files of the same subject and session?",
            )
        array, fits[seq] = onto_reference(other, ref, coregister, subject, seq)
        arrays.append(array)
    meta = {**ref.meta, "sequences": list(channels), "subject": subject, "coregistration": fits}
    meta["files"] = {s: v.path for s, v in volumes.items()}
    return Volume(np.stack(arrays, axis=-1), ref.affine, ref.path, meta)


def read_subject(subject: Subject, channels: Sequence[str], read: Callable[[Any], Volume]) -> Volume:
    """Read every sequence of ``subject`` with ``read``, each on its own grid (:func:`align` puts them on one).

    One sequence gives its plain volume; several a :class:`SubjectScans`. A file that cannot be read
    is reported with its path, its sequence and the subject.
    """
    subject.check(channels)
    volumes = {}
    for seq in channels:
        try:
            volumes[seq] = read(subject.files[seq])
        except DataError as exc:
            raise DataError(
                exc.path or subject.stem, f"{exc.reason} ({seq} of subject {subject.stem})"
            ) from None
    ref = volumes[channels[0]]
    meta = {**ref.meta, "sequences": list(channels), "subject": subject.stem}
    if len(channels) == 1:
        ref.meta = meta
        ref.path = ref.path or subject.stem
        return ref
    return SubjectScans(ref.array, ref.affine, ref.path or subject.stem, meta, volumes)


def align(volume: Volume, coregister: bool | str = "auto") -> tuple[Volume, dict[str, dict[str, Any]]]:
    """``volume``'s sequences on the reference grid (see :func:`stack_sequences`) and what each fit did;
    a volume that is not a :class:`SubjectScans` is on one grid already and comes back as it is."""
    if not isinstance(volume, SubjectScans):
        return volume, {}
    names = list(volume.sequences)
    stacked = stack_sequences(
        volume.sequences, names, coregister, str(volume.meta.get("subject", volume.path))
    )
    stacked.path = volume.path
    return stacked, stacked.meta["coregistration"]
