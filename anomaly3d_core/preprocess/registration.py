"""Affine registration of brain MRI to the MNI152 2009 template (nilearn ships it) with SimpleITK.

The scan is resampled onto the template's 2 mm grid; :func:`to_native` takes any map on that
grid back onto the scan's own grid through the inverse transform.

How :func:`register` fits the transform (chosen by measurement, ``experiments/bench_registration.py``):

1. the template, its dilated brain mask (where the metric samples) and its brain mask (for the
   quality figure) are prepared once per process and template (:func:`template`);
2. the scan is block-averaged to about the template's voxel size (``BinShrink``, 1 mm -> 2 mm);
3. centre-of-mass initialisation (``CenteredTransformInitializer``, moments);
4. rigid stage at 8 mm then 4 mm, affine stage at 4 mm then 2 mm, both gradient descent with
   the step estimated at every iteration (they bring the scan into the capture range; rigid
   first was more accurate than straight affine and as robust); Mattes mutual information on
   random samples (fixed seed) inside the template's brain mask dilated by 40 mm;
5. a short regular-step affine refinement against the scan at its own resolution, sampling the
   brain and 20 mm around it, which converges the fit and removes the sub-voxel bias that the
   block averaging leaves (a 10 mm margin was as accurate and 0.2 s faster on 1 mm scans, but
   fitted the 4 mm demo subjects slightly worse).

With ``deformable=True`` (``data.preprocessing.deformable``) a coarse BSpline step follows the
affine fit (:func:`fit_deformable`: Mattes MI at 4 mm, control points every 32 mm): after an affine
fit subjects still differ by smooth deformations of a few millimetres, so a location-wise
normative score compares slightly different tissue. Scans are resampled once through the
composite transform; maps come back through the inverse affine and the inverse of the BSpline
(a 4 mm displacement field, :func:`inverse_deformation`).

Each fit gets two quality figures (:data:`QUALITY_KEYS`): ``registration_dice``, the Dice overlap
of the registered scan's foreground with the template's brain mask, and ``registration_metric``,
the final Mattes mutual information (negative; lower is a better fit). A fit with Dice below
:data:`POOR_DICE` or metric above :data:`POOR_METRIC` is logged as a warning naming the file.
Both figures assume a skull-stripped brain scan, as the template is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.filters import threshold_otsu

from anomaly3d_core.errors import ConfigError, DataError, did_you_mean
from anomaly3d_core.io.sitk_geometry import volume_to_image
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.deformable import (
    _composite,
    _mean_displacement,
    bspline_transform,
    fit_deformable,
    inverse_deformation,
)

log = logging.getLogger(__name__)

TEMPLATES = ("mni152",)
QUALITY_KEYS = ("registration_dice", "registration_metric")
# Measured on synthetic scans (experiments/bench_registration.py, results/registration.json):
# good fits of skull-stripped 1 mm and 4 mm scans (T1, and T2/FLAIR/PD-like contrasts) give Dice
# 0.96-0.99 and metric -0.82 to -1.46; uniform noise gives Dice ~0.4 and metric ~0; a featureless
# ellipsoid Dice 0.91 and metric -0.39; a brain upside down Dice 0.86-0.89 and metric -0.33 to
# -0.36. Dice alone misses the last two, hence the metric threshold; both are provisional until
# checked on real scans.
POOR_DICE = 0.8
POOR_METRIC = -0.5


@dataclass(frozen=True)
class _Stage:
    """One call of SimpleITK's registration method: a transform, its levels and its optimizer."""

    transform: str  # "rigid" or "affine"
    # (resolution in mm the template grid is shrunk to, smoothing sigma in mm, fraction sampled)
    levels: tuple[tuple[float, float, float], ...]
    optimizer: str  # "gd": gradient descent, step re-estimated each iteration; "rsgd": regular step
    iterations: int
    step: float = 1.0  # rsgd: first step (physical-shift scaled units)
    full: bool = False  # against the scan at its own resolution rather than block-averaged
    mask_mm: float = 40.0  # the metric samples the template's brain mask dilated by this much


_STAGES = (
    _Stage("rigid", ((8.0, 2.0, 0.2), (4.0, 1.0, 0.1)), "gd", 100),
    _Stage("affine", ((4.0, 1.0, 0.1), (2.0, 0.0, 0.05)), "gd", 100),
    _Stage("affine", ((2.0, 0.0, 0.05),), "rsgd", 30, step=0.25, full=True, mask_mm=20.0),
)
_THREADS_LOCK = threading.Lock()
_MIN_SAMPLES = 2000  # per level, before the mask: tiny templates sample a larger fraction


@functools.lru_cache(maxsize=1)
def _mni152() -> tuple[Volume, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=2)
    mask = np.asarray(load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5
    array = np.where(mask, np.asarray(t1.get_fdata(), np.float32), 0.0).astype(np.float32)
    return Volume(array, t1.affine.copy(), "MNI152NLin2009"), mask


def mni152_reference() -> Volume:
    """The skull-stripped MNI152 2009 T1 template on its 2 mm grid."""
    return _mni152()[0]


def reference(name: str) -> Volume:
    return template(name).volume


@dataclass(frozen=True)
class Template:
    """A registration target prepared once: the image, its brain mask, where the metric samples."""

    volume: Volume
    image: sitk.Image
    brain: np.ndarray
    name: str
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_volume(
        cls, volume: Volume, brain: np.ndarray | None = None, name: str | None = None
    ) -> Template:
        """Any skull-stripped template; its brain mask defaults to its non-zero voxels."""
        brain = np.asarray(volume.array) > 0 if brain is None else np.asarray(brain, bool)
        tpl = cls(
            volume=volume,
            image=volume_to_image(np.asarray(volume.array, np.float32), volume.affine),
            brain=brain,
            name=name or str(volume.path or "template"),
        )
        for stage in _STAGES:
            tpl.sampling_mask(stage.mask_mm)
        return tpl

    def sampling_mask(self, mm: float) -> sitk.Image:
        """The brain mask dilated by ``mm`` (city-block steps of the grid), prepared once."""
        if mm not in self._masks:
            spacing = float(np.sqrt((np.asarray(self.volume.affine)[:3, :3] ** 2).sum(axis=0)).mean())
            mask = ndimage.binary_dilation(self.brain, iterations=max(1, int(round(mm / spacing))))
            image = volume_to_image(mask.astype(np.float32), self.volume.affine)
            self._masks[mm] = sitk.Cast(image, sitk.sitkUInt8)
        return self._masks[mm]


@functools.cache
def template(name: str) -> Template:
    """The named template, prepared once per process."""
    if name != "mni152":
        raise ConfigError("data.preprocessing.register_to: " + did_you_mean(name, TEMPLATES, "template"))
    volume, brain = _mni152()
    return Template.from_volume(volume, brain, name)


@dataclass
class Registration:
    """The scan on the template grid, the transform (template -> scan points) and its quality."""

    array: np.ndarray
    params: list[float]
    dice: float
    metric: float
    deformation: list[float] | None = None  # BSpline (template -> affinely aligned points), see deformable
    displacement_mm: float | None = None  # mean displacement of the deformable step inside the brain

    @property
    def quality(self) -> dict[str, float]:
        return {"registration_dice": self.dice, "registration_metric": self.metric}


def _method(fixed: sitk.Image, tpl: Template, stage: _Stage, seed: int) -> sitk.ImageRegistrationMethod:
    size = np.array(fixed.GetSize())
    spacing = float(np.mean(fixed.GetSpacing()))
    shrinks = [max(1, int(round(resolution / spacing))) for resolution, _, _ in stage.levels]
    fractions = [
        float(min(1.0, max(fraction, _MIN_SAMPLES / float(np.prod(np.maximum(size // shrink, 1))))))
        for shrink, (_, _, fraction) in zip(shrinks, stage.levels, strict=True)
    ]
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(fractions, seed + 1)  # SimpleITK's seed 0 means the wall clock
    # gradients by central differences at the samples, not a gradient image of the whole scan
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricFixedMask(tpl.sampling_mask(stage.mask_mm))
    reg.SetInterpolator(sitk.sitkLinear)
    if stage.optimizer == "rsgd":
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=stage.step,
            minStep=1e-4,
            numberOfIterations=stage.iterations,
            gradientMagnitudeTolerance=1e-6,
        )
    else:
        reg.SetOptimizerAsGradientDescent(
            learningRate=1.0,
            numberOfIterations=stage.iterations,
            convergenceMinimumValue=1e-7,
            convergenceWindowSize=10,
            estimateLearningRate=reg.EachIteration,
        )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrinks)
    reg.SetSmoothingSigmasPerLevel([sigma for _, sigma, _ in stage.levels])
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    return reg


THREADS_ENV = "ANOMALY3D_REGISTRATION_THREADS"


def registration_threads() -> int:
    """SimpleITK threads for a fit: ``$ANOMALY3D_REGISTRATION_THREADS``, default 1; 0 = ITK's default (all cores)."""
    text = os.environ.get(THREADS_ENV, "").strip()
    try:
        return max(0, int(text)) if text else 1
    except ValueError:
        return 1


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Fits inside the block run on :func:`registration_threads` SimpleITK threads (default one).

    ITK sums the registration metric over threads in an order that varies with thread timing, so a
    multi-threaded fit differs from run to run (affine terms by ~1e-3, enough to move scores at the
    brain's edge); on one thread a fit repeats exactly, at about twice the time on 2 cores
    (``ANOMALY3D_REGISTRATION_THREADS=0`` trades that back).
    """
    threads = registration_threads()
    if threads == 0:
        yield
        return
    with _THREADS_LOCK:
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _run(reg: sitk.ImageRegistrationMethod, fixed, moving, initial) -> sitk.Transform:
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(fixed, moving)
    return out.GetNthTransform(0) if isinstance(out, sitk.CompositeTransform) else out


def _foreground_dice(array: np.ndarray, brain: np.ndarray) -> float:
    """Dice of the registered scan's foreground (Otsu, holes filled) with the template brain mask."""
    values = array[np.isfinite(array)]
    if values.size == 0 or float(values.max()) <= float(values.min()):
        return 0.0
    fg = ndimage.binary_fill_holes(array > threshold_otsu(values))
    total = int(fg.sum()) + int(brain.sum())
    return float(2.0 * np.logical_and(fg, brain).sum() / total) if total else 0.0


def register(
    volume: Volume, target: str | Volume | Template = "mni152", seed: int = 0, deformable: bool = False
) -> Registration:
    """Affine (12-parameter) Mattes-MI registration of ``volume`` to a template, then optionally a
    coarse deformable step (:func:`fit_deformable`: BSpline, Mattes MI at 4 mm).

    ``target`` is a template name (prepared once per process), a :class:`Template` or a
    skull-stripped template :class:`Volume`. Returns the scan resampled on the template's grid,
    the transform as ``[12 affine parameters, 3 centre coordinates]`` (template points to scan
    points, SimpleITK's LPS convention) and the quality figures; a poor fit is logged as a warning.
    """
    tpl = (
        target
        if isinstance(target, Template)
        else template(target)
        if isinstance(target, str)
        else Template.from_volume(target)
    )
    fixed = tpl.image
    moving = volume_to_image(np.asarray(volume.array, np.float32), volume.affine)
    factors = [
        max(1, int(round(f / m))) for f, m in zip(fixed.GetSpacing(), moving.GetSpacing(), strict=True)
    ]
    coarse = sitk.BinShrink(moving, factors) if max(factors) > 1 else moving
    try:
        with single_threaded():  # the fit repeats exactly (see single_threaded)
            tx: sitk.Transform = sitk.CenteredTransformInitializer(
                fixed, coarse, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
            )
            for stage in _STAGES:
                if stage.transform == "affine" and not isinstance(tx, sitk.AffineTransform):
                    rigid = sitk.Euler3DTransform(tx)
                    tx = sitk.AffineTransform(3)
                    tx.SetCenter(rigid.GetCenter())
                    tx.SetMatrix(rigid.GetMatrix())
                    tx.SetTranslation(rigid.GetTranslation())
                method = _method(fixed, tpl, stage, seed)
                out = _run(method, fixed, moving if stage.full else coarse, tx)
                tx = sitk.AffineTransform(out) if stage.transform == "affine" else sitk.Euler3DTransform(out)
            affine = tx
            bspline, displacement = None, None
            if deformable:
                aligned = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
                bspline = fit_deformable(aligned, tpl, seed)
                displacement = _mean_displacement(bspline, tpl)
            final = _composite(affine, bspline)
            method.SetInitialTransform(final, inPlace=False)
            metric = float(method.MetricEvaluate(fixed, moving))
    except RuntimeError as exc:
        raise DataError(
            volume.path, f"registration to the template failed ({str(exc).strip().splitlines()[-1]})"
        ) from None
    out = sitk.Resample(moving, fixed, final, sitk.sitkLinear, 0.0)
    array = np.ascontiguousarray(np.transpose(sitk.GetArrayViewFromImage(out), (2, 1, 0)), dtype=np.float32)
    result = Registration(
        array,
        [*affine.GetParameters(), *affine.GetFixedParameters()],
        round(_foreground_dice(array, tpl.brain), 4),
        round(metric if np.isfinite(metric) else 0.0, 4),
        None if bspline is None else [*bspline.GetFixedParameters(), *bspline.GetParameters()],
        None if displacement is None else round(displacement, 3),
    )
    if result.dice < POOR_DICE or result.metric > POOR_METRIC:
        log.warning(
            "%s: poor registration to the template %s (Dice with its brain mask %.2f, threshold %.2f; "
            "Mattes MI %.3f, threshold %.2f); is it a skull-stripped brain MRI?",
            volume.path or "<array>",
            tpl.name,
            result.dice,
            POOR_DICE,
            result.metric,
            POOR_METRIC,
        )
    return result


def registration_quality(prepared) -> dict[str, float]:
    """``registration_dice`` and ``registration_metric`` of a prepared scan; empty when not registered.

    ``prepared`` is a :class:`~anomaly3d_core.preprocess.preprocessing.Prepared` or its record.
    """
    record = getattr(prepared, "record", prepared)
    if getattr(record, "registration", None) is None:
        return {}
    return {key: float(value) for key in QUALITY_KEYS if (value := getattr(record, key, None)) is not None}


def _affine_transform(params: list[float]) -> sitk.AffineTransform:
    tx = sitk.AffineTransform(3)
    tx.SetParameters(params[:12])
    tx.SetFixedParameters(params[12:])
    return tx


def to_native(
    array: np.ndarray,
    ref_affine: np.ndarray,
    params: list[float],
    shape: tuple[int, ...],
    affine: np.ndarray,
    order: int = 1,
    deformation: list[float] | None = None,
) -> np.ndarray:
    """Resample a map on the template grid onto the scan's own grid (``shape``, ``affine``).

    With a ``deformation`` the scan's points go through the inverse affine, then the inverse of the
    deformable step (:func:`inverse_deformation`).
    """
    inverse: sitk.Transform = _affine_transform(params).GetInverse()
    if deformation is not None:
        inverse = sitk.CompositeTransform([inverse_deformation(deformation), inverse])
    source = volume_to_image(np.asarray(array, np.float32), ref_affine)
    grid = volume_to_image(np.zeros((1, 1, 1), np.float32), affine)  # the target's geometry only
    out = sitk.Resample(
        source,
        [int(s) for s in shape],
        inverse,
        sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear,
        grid.GetOrigin(),
        grid.GetSpacing(),
        grid.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    return np.ascontiguousarray(np.transpose(sitk.GetArrayViewFromImage(out), (2, 1, 0)))


def apply_transform(
    array: np.ndarray,
    affine: np.ndarray,
    ref: Volume,
    params: list[float],
    order: int = 1,
    deformation: list[float] | None = None,
) -> np.ndarray:
    """Carry an array on the scan's grid onto the template grid with a fitted transform
    (linear, or nearest for ``order=0``): a subject's other sequences follow its reference."""
    tx = _composite(
        _affine_transform(params), None if deformation is None else bspline_transform(deformation)
    )
    source = volume_to_image(np.asarray(array, np.float32), affine)
    fixed = volume_to_image(np.zeros(ref.shape, np.float32), ref.affine)
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    out = sitk.Resample(source, fixed, tx, interp, 0.0, sitk.sitkFloat32)
    return np.ascontiguousarray(np.transpose(sitk.GetArrayViewFromImage(out), (2, 1, 0)))


def register_mask(
    mask: np.ndarray,
    affine: np.ndarray,
    ref: Volume,
    params: list[float],
    deformation: list[float] | None = None,
) -> np.ndarray:
    """Carry a mask on the scan's grid onto the template grid with the same transform (nearest)."""
    return apply_transform(mask, affine, ref, params, order=0, deformation=deformation) > 0.5
