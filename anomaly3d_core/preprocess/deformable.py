"""The coarse deformable step after the affine registration: a BSpline fitted at 4 mm (Mattes mutual
information, control points every 32 mm), composed with the affine, and its inverse for mapping
score maps back to each scan's own grid. :mod:`.registration` runs it when
``data.preprocessing.deformable`` is set; ``tpl`` is a registration ``Template``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import SimpleITK as sitk

# ---------------------------------------------------------------------------- the deformable step
#: the deformable step's grid (mm) and BSpline control-point spacing (mm): coarse, so the warp stays
#: smooth (the mesh is the regulariser) and the fit takes a fraction of a second
DEFORMABLE_MM = 4.0
CONTROL_SPACING_MM = 32.0
DEFORMABLE_ITERATIONS = 20
DEFORMABLE_SAMPLES = 0.05  # fraction of the 4 mm grid's voxels in the mask, drawn per iteration


def _composite(affine: sitk.Transform, bspline: sitk.Transform | None) -> sitk.Transform:
    """Template points -> scan points: the deformable step (template -> affinely aligned), then the affine."""
    if bspline is None:
        return affine
    return sitk.CompositeTransform([affine, bspline])  # applied last to first: affine(bspline(x))


def bspline_transform(deformation: list[float]) -> sitk.BSplineTransform:
    """The BSpline transform stored as ``[18 fixed parameters, coefficients]``."""
    tx = sitk.BSplineTransform(3, 3)
    tx.SetFixedParameters([float(v) for v in deformation[:18]])
    tx.SetParameters([float(v) for v in deformation[18:]])
    return tx


def fit_deformable(aligned: sitk.Image, tpl: Any, seed: int = 0) -> sitk.BSplineTransform:
    """A coarse BSpline from the template to an affinely aligned scan (on the template grid).

    Mattes MI (any contrast) on both images block-averaged to :data:`DEFORMABLE_MM`, control points
    every :data:`CONTROL_SPACING_MM` over the template (the coarse mesh is the regulariser: the warp
    is smooth at the few-millimetre scale of anatomical variation and cannot fold locally),
    :data:`DEFORMABLE_ITERATIONS` of L-BFGS-B on :data:`DEFORMABLE_SAMPLES` of the voxels (random,
    fixed seed) in the template's brain mask dilated by 10 mm; run inside :func:`single_threaded`
    by :func:`register`, so a fit repeats exactly.
    """
    fixed = tpl.image
    shrink = [max(1, int(round(DEFORMABLE_MM / s))) for s in fixed.GetSpacing()]
    fixed_c, moving_c = sitk.BinShrink(fixed, shrink), sitk.BinShrink(aligned, shrink)
    extent = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)]
    mesh = [max(1, int(round(e / CONTROL_SPACING_MM))) for e in extent]
    tx = sitk.BSplineTransformInitializer(fixed_c, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(DEFORMABLE_SAMPLES, seed + 1)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricFixedMask(sitk.BinShrink(tpl.sampling_mask(10.0), shrink) > 0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=DEFORMABLE_ITERATIONS,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=2 * DEFORMABLE_ITERATIONS,
        costFunctionConvergenceFactor=1e7,
    )
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(sitk.Cast(fixed_c, sitk.sitkFloat32), sitk.Cast(moving_c, sitk.sitkFloat32))
    return tx


def _deformable_grid(tx: sitk.BSplineTransform) -> tuple[list[int], tuple, tuple, tuple]:
    """Size, origin, spacing and direction of a :data:`DEFORMABLE_MM` grid over the BSpline's domain."""
    fixed = np.asarray(tx.GetFixedParameters(), float)
    mesh_size, origin, spacing, direction = fixed[:3], fixed[3:6], fixed[6:9], fixed[9:18]
    # the control grid extends one spacing before and two after the image domain (cubic order)
    start = origin + direction.reshape(3, 3) @ spacing
    extent = (mesh_size - 3) * spacing
    size = [max(2, int(np.ceil(e / DEFORMABLE_MM)) + 1) for e in extent]
    return size, tuple(start), (DEFORMABLE_MM,) * 3, tuple(direction)


def inverse_deformation(deformation: list[float]) -> sitk.DisplacementFieldTransform:
    """The inverse of the deformable step (affinely aligned points -> template points), as a field at 4 mm.

    Kept for the last few scans: a score map, its mask and its foreground go back through the same one.
    """
    return _inverse_deformation(tuple(float(v) for v in deformation))


@functools.lru_cache(maxsize=4)
def _inverse_deformation(deformation: tuple[float, ...]) -> sitk.DisplacementFieldTransform:
    tx = bspline_transform(list(deformation))
    size, origin, spacing, direction = _deformable_grid(tx)
    field = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, size, origin, spacing, direction)
    inverse = sitk.InvertDisplacementField(
        field,
        maximumNumberOfIterations=20,
        maxErrorToleranceThreshold=0.1,
        meanErrorToleranceThreshold=0.001,
        enforceBoundaryCondition=True,
    )
    return sitk.DisplacementFieldTransform(inverse)


def _mean_displacement(tx: sitk.BSplineTransform, tpl: Any, n: int = 4000) -> float:
    """Mean length (mm) of the deformable step's displacement at (up to ``n``) template brain voxels."""
    idx = np.argwhere(tpl.brain)
    idx = idx[:: max(1, len(idx) // n)]
    points = [tpl.image.TransformIndexToPhysicalPoint(tuple(int(v) for v in i)) for i in idx]
    moved = [tx.TransformPoint(p) for p in points]
    return float(np.linalg.norm(np.subtract(moved, points), axis=1).mean()) if points else 0.0
