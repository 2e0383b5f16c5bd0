"""The example scan every built-in loader writes for the conformance kit (``example_file``).

Integer values in a small range, so every format (int16 DICOM included) stores them exactly, on
an anisotropic, rotated affine with flipped axes: the hard case for geometry round trips.
"""

from __future__ import annotations

import numpy as np

from anomaly3d_core.io.volume import Volume


def example_affine() -> np.ndarray:
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, 0.9, -2.5])
    affine[:3, 3] = [30.5, -12.25, 7.0]
    return affine


def example_volume(dtype: type = np.float32) -> Volume:
    array = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 3 - 20).astype(dtype)
    return Volume(array, example_affine(), "example")
