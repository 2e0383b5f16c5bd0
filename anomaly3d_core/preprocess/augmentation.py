"""Seeded 3D augmentation: rotation, flips, noise, brightness/contrast/gamma, bias field, elastic."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from anomaly3d_core.config import AugmentationConfig


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, control: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1]: noise on a ``control``³ grid, cubic-upsampled."""
    coarse = rng.uniform(-1, 1, size=(control,) * len(shape))
    zoom = [s / control for s in shape]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")
    return field[tuple(slice(0, s) for s in shape)]


def augment_volume(
    volume: np.ndarray,
    rotation_range: float = 10.0,
    flip_probability: float = 0.0,
    noise_std: float = 0.01,
    brightness_range: float = 0.1,
    contrast_range: float = 0.1,
    gamma_range: float = 0.0,
    bias_field_strength: float = 0.0,
    elastic_strength: float = 0.0,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Return an augmented copy of ``volume``; the same ``rng`` seed gives the same result.

    Rotation is in degrees about each axis; ``elastic_strength`` is the largest displacement
    in voxels; ``bias_field_strength`` the largest multiplicative deviation (0.2 = ±20 %).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = np.asarray(volume, dtype=np.float32).copy()
    background = float(out.min())
    if rotation_range > 0:
        for axes in ((0, 1), (0, 2), (1, 2)):
            angle = rng.uniform(-rotation_range, rotation_range)
            out = ndimage.rotate(
                out, angle, axes=axes, reshape=False, order=1, mode="constant", cval=background
            )
    if elastic_strength > 0:
        coords = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in out.shape], indexing="ij")
        coords = [c + elastic_strength * smooth_field(out.shape, rng) for c in coords]
        out = ndimage.map_coordinates(out, coords, order=1, mode="nearest").astype(np.float32)
    for axis in range(3):
        if rng.random() < flip_probability:
            out = np.flip(out, axis=axis)
    fg = out > background
    if bias_field_strength > 0:
        out = np.where(
            fg,
            (out - background) * (1 + bias_field_strength * smooth_field(out.shape, rng, 3)) + background,
            out,
        )
    if gamma_range > 0:
        lo, hi = float(out.min()), float(out.max())
        unit = (out - lo) / ((hi - lo) or 1.0)
        out = unit ** np.exp(rng.uniform(-gamma_range, gamma_range)) * (hi - lo) + lo
    if contrast_range > 0 or brightness_range > 0:
        mean = float(out[fg].mean()) if fg.any() else float(out.mean())
        out = (out - mean) * (1 + rng.uniform(-contrast_range, contrast_range)) + mean
        out = out + rng.uniform(-brightness_range, brightness_range) * float(out.std())
    if noise_std > 0:
        out = out + rng.normal(0, noise_std * float(out.std()), out.shape)
    return np.ascontiguousarray(out, dtype=np.float32)


def augment_from_config(
    volume: np.ndarray, config: AugmentationConfig, rng: np.random.Generator
) -> np.ndarray:
    """Augment a prepared array; the sequences of a ``(C, X, Y, Z)`` array move together."""
    if volume.ndim == 4:  # one seed for every channel: the same rotation, deformation and flips
        seed = int(rng.integers(2**32))
        return np.stack([augment_from_config(c, config, np.random.default_rng(seed)) for c in volume])
    return augment_volume(
        volume,
        rotation_range=config.rotation_range,
        flip_probability=config.flip_probability,
        noise_std=config.noise_std,
        brightness_range=config.brightness_range,
        contrast_range=config.contrast_range,
        gamma_range=config.gamma_range,
        bias_field_strength=config.bias_field_strength,
        elastic_strength=config.elastic_strength,
        rng=rng,
    )
