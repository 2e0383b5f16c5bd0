"""Affine registration of brain MRI to the MNI152 2009 template (nilearn ships it) with SimpleITK.

The scan is resampled onto the template's 2 mm grid; :func:`to_native` takes any map on that
grid back onto the scan's own grid through the inverse transform.
"""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk

from anomaly3d_core.errors import DataError
from anomaly3d_core.io.sitk_geometry import volume_to_image
from anomaly3d_core.io.volume import Volume

TEMPLATES = ("mni152",)


@functools.lru_cache(maxsize=1)
def mni152_reference() -> Volume:
    """The skull-stripped MNI152 2009 T1 template on its 2 mm grid."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=2)
    mask = np.asarray(load_mni152_brain_mask(resolution=2).get_fdata()) > 0.5
    return Volume(
        np.where(mask, np.asarray(t1.get_fdata(), np.float32), 0.0).astype(np.float32),
        t1.affine.copy(),
        "MNI152NLin2009",
    )


def reference(name: str) -> Volume:
    if name != "mni152":
        from anomaly3d_core.errors import ConfigError, did_you_mean

        raise ConfigError("data.preprocessing.register_to: " + did_you_mean(name, TEMPLATES, "template"))
    return mni152_reference()


def register(volume: Volume, ref: Volume, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Affine (12-parameter) Mattes-MI registration; returns the scan on ``ref``'s grid and the transform.

    The transform (parameters + fixed centre) maps template points to scan points.
    """
    fixed = volume_to_image(ref.array.astype(np.float32), ref.affine)
    moving = volume_to_image(np.asarray(volume.array, np.float32), volume.affine)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    try:
        tx = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise DataError(
            volume.path, f"registration to the template failed ({str(exc).strip().splitlines()[-1]})"
        ) from None
    affine_tx = sitk.AffineTransform(tx.GetNthTransform(0) if isinstance(tx, sitk.CompositeTransform) else tx)
    out = sitk.Resample(moving, fixed, affine_tx, sitk.sitkLinear, 0.0)
    array = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)).astype(np.float32)
    return np.ascontiguousarray(array), [*affine_tx.GetParameters(), *affine_tx.GetFixedParameters()]


def to_native(
    array: np.ndarray,
    ref_affine: np.ndarray,
    params: list[float],
    shape: tuple[int, ...],
    affine: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Resample a map on the template grid onto the scan's own grid (``shape``, ``affine``)."""
    tx = sitk.AffineTransform(3)
    tx.SetParameters(params[:12])
    tx.SetFixedParameters(params[12:])
    source = volume_to_image(np.asarray(array, np.float32), ref_affine)
    target = volume_to_image(np.zeros(shape, np.float32), affine)
    out = sitk.Resample(
        source, target, tx.GetInverse(), sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear, 0.0
    )
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)))


def register_mask(mask: np.ndarray, affine: np.ndarray, ref: Volume, params: list[float]) -> np.ndarray:
    """Carry a mask on the scan's grid onto the template grid with the same transform (nearest)."""
    tx = sitk.AffineTransform(3)
    tx.SetParameters(params[:12])
    tx.SetFixedParameters(params[12:])
    source = volume_to_image(np.asarray(mask, np.float32), affine)
    fixed = volume_to_image(np.zeros(ref.shape, np.float32), ref.affine)
    out = sitk.Resample(source, fixed, tx, sitk.sitkNearestNeighbor, 0.0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)) > 0.5
