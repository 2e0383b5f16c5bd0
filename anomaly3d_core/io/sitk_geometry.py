"""Conversion between SimpleITK images (LPS, z-y-x arrays) and RAS+ affines (i-j-k arrays)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from anomaly3d_core.io.volume import Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def image_to_volume(image: sitk.Image, path: str | None = None) -> Volume:
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)
    array = sitk.GetArrayFromImage(image)
    array = np.ascontiguousarray(np.transpose(array, tuple(range(array.ndim))[::-1]))
    return Volume(array, affine, path)


def volume_to_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    direction = _LPS_TO_RAS @ affine[:3, :3] / spacing
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in direction.ravel()))
    image.SetOrigin(tuple(float(o) for o in _LPS_TO_RAS @ affine[:3, 3]))
    return image
