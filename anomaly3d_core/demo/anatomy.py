"""Synthetic anatomy for the demo data: the MNI152 atlas, subjects that vary around it, lesions.

Shared by the template-space generator (:mod:`.datasets`) and the native-space one (:mod:`.native`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomaly3d_core.errors import ConfigError, did_you_mean
from anomaly3d_core.preprocess.augmentation import smooth_field

LESION_KINDS: tuple[str, ...] = ("tumour", "infarct", "ms", "haemorrhage")
SIZES = {"tiny": (4, 1, 3), "small": (12, 4, 8), "medium": (16, 6, 12), "large": (32, 10, 30)}


@dataclass(frozen=True)
class Atlas:
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@functools.lru_cache(maxsize=4)
def mni_atlas(voxel_size: float = 2.0) -> Atlas:
    """MNI152 2009 T1, GM and WM probability maps and brain mask, resampled to ``voxel_size`` mm."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    imgs = [
        load_mni152_template(2),
        load_mni152_gm_template(2),
        load_mni152_wm_template(2),
        load_mni152_brain_mask(2),
    ]
    arrays = [np.asarray(img.get_fdata(), dtype=np.float32) for img in imgs]
    affine = imgs[0].affine.copy()
    zoom = 2.0 / voxel_size
    if zoom != 1.0:
        arrays = [ndimage.zoom(a, zoom, order=1) for a in arrays]
        affine[:3, :3] *= voxel_size / 2.0
    t1, gm, wm, mask = arrays
    t1 = t1 / np.percentile(t1[mask > 0.5], 99)
    return Atlas(t1, np.clip(gm, 0, 1), np.clip(wm, 0, 1), mask > 0.5, affine)


#: ``field(shape, rng, control=n)``: a smooth random field in about [-1, 1]
Field = Callable[..., np.ndarray]


def _warp(
    arrays: list[np.ndarray], rng: np.random.Generator, deform: float, field: Field = smooth_field
) -> list[np.ndarray]:
    """Apply one random affine jitter plus a smooth deformation to all ``arrays``."""
    shape = arrays[0].shape
    centre = (np.array(shape) - 1) / 2
    angles = np.deg2rad(rng.uniform(-3, 3, 3))
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot * rng.uniform(0.95, 1.05, 3)
    shift = rng.uniform(-1.5, 1.5, 3)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=0)
    coords = (
        np.tensordot(matrix, grid - centre[:, None, None, None], axes=1)
        + (centre + shift)[:, None, None, None]
    )
    coords += np.stack([deform * field(shape, rng, control=5) for _ in range(3)])
    return [
        ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
        for a in arrays
    ]


def _blob(
    shape: tuple[int, ...],
    centre: np.ndarray,
    radii: np.ndarray,
    rng: np.random.Generator,
    roughness: float = 0.35,
) -> np.ndarray:
    """An irregular lesion shape: an ellipsoid with a smoothly perturbed surface."""
    lo = np.maximum(0, np.floor(centre - 2 * radii).astype(int))
    hi = np.minimum(shape, np.ceil(centre + 2 * radii).astype(int) + 1)
    sub = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.meshgrid(
        *[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)], indexing="ij"
    )
    dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))
    sub_shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    wobble = roughness * smooth_field(sub_shape, rng, control=3)
    out = np.zeros(shape, dtype=bool)
    out[sub] = dist < 1.0 + wobble
    return out


def _pick_centre(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = np.argwhere(region)
    return idx[rng.integers(len(idx))].astype(np.float32)


def add_lesion(
    image: np.ndarray,
    brain: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    voxel_size: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Insert one lesion of ``kind``; returns the new image and its ground-truth mask."""
    scale = 2.0 / voxel_size  # radii below are in 2 mm voxels
    inner = ndimage.binary_erosion(brain, iterations=max(1, int(round(6 * scale))))
    wm_region = (wm > 0.6) & inner
    gm_region = (gm > 0.5) & ndimage.binary_erosion(brain, iterations=max(1, int(round(2 * scale))))
    wm_level = float(np.median(image[wm > 0.8])) if (wm > 0.8).any() else float(image[brain].mean())
    mask = np.zeros(image.shape, dtype=bool)
    out = image.copy()
    if kind == "ms":
        for _ in range(int(rng.integers(4, 9))):
            region = wm_region if wm_region.any() else inner
            m = (
                _blob(image.shape, _pick_centre(region, rng), rng.uniform(1.5, 3.0, 3) * scale, rng, 0.2)
                & brain
            )
            mask |= m
        target = np.full(image.shape, wm_level * rng.uniform(0.45, 0.6), np.float32)
    elif kind == "infarct":
        region = gm_region if gm_region.any() else inner
        mask = _blob(image.shape, _pick_centre(region, rng), rng.uniform(4, 7, 3) * scale, rng) & brain
        target = np.full(image.shape, wm_level * rng.uniform(0.25, 0.4), np.float32)
    elif kind == "tumour":
        mask = _blob(image.shape, _pick_centre(inner, rng), rng.uniform(5, 9, 3) * scale, rng) & brain
        core = ndimage.binary_erosion(mask, iterations=max(1, int(round(2 * scale))))
        target = np.where(
            core, wm_level * rng.uniform(0.35, 0.55), wm_level * rng.uniform(1.25, 1.45)
        ).astype(np.float32)
    elif kind == "haemorrhage":
        mask = _blob(image.shape, _pick_centre(inner, rng), rng.uniform(3, 6, 3) * scale, rng) & brain
        target = np.full(image.shape, wm_level * rng.uniform(1.4, 1.7), np.float32)
    else:
        raise ValueError(f"unknown lesion kind '{kind}'; available: {', '.join(LESION_KINDS)}")
    # soft edge: blend with a slightly blurred mask so the lesion border is not a perfect step
    weight = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), 0.7 * scale), 0, 1)
    weight = np.where(mask, np.maximum(weight, 0.8), weight * 0.5)
    texture = 1.0 + 0.05 * smooth_field(image.shape, rng, control=8)
    out = (1 - weight) * out + weight * target * texture
    return out.astype(np.float32), mask


def make_subject(
    atlas: Atlas, rng: np.random.Generator, lesion_kind: str | None = None, voxel_size: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic skull-stripped T1 scan and its lesion mask (empty for a normal subject)."""
    contrast_gm, contrast_wm = rng.normal(0, 0.06, 2)
    t1, gm, wm, brain = _warp(
        [atlas.t1, atlas.gm, atlas.wm, atlas.mask.astype(np.float32)], rng, deform=2.0 * 2.0 / voxel_size
    )
    brain = brain > 0.5
    image = t1 * (1 + contrast_gm * gm + contrast_wm * wm)
    mask = np.zeros(image.shape, dtype=bool)
    if lesion_kind is not None:
        image, mask = add_lesion(image, brain, gm, wm, lesion_kind, rng, voxel_size)
    return acquire(image, brain, rng), mask & brain


def acquire(
    image: np.ndarray, brain: np.ndarray, rng: np.random.Generator, field: Field = smooth_field
) -> np.ndarray:
    """Bias field and Rician noise of the template-space demo; background zero, units ×1000."""
    image = image * np.exp(0.12 * field(image.shape, rng, control=3))
    sigma = 0.025 * float(np.percentile(image[brain], 99))
    image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    image = np.where(brain, image, 0.0).astype(np.float32)
    return image * 1000.0


def subject_plan(
    size: str,
    lesion_kinds: tuple[str, ...],
    n_train: int | None = None,
    n_test_normal: int | None = None,
    n_test_anomalous: int | None = None,
) -> list[tuple[str, str | None]]:
    """``(split, lesion kind or None)`` for every subject of a demo set of ``size`` (counts may be given)."""
    if size not in SIZES:
        raise ConfigError("size: " + did_you_mean(size, SIZES, "size"))
    dn_train, dn_normal, dn_anom = SIZES[size]
    n_train = dn_train if n_train is None else n_train
    n_test_normal = dn_normal if n_test_normal is None else n_test_normal
    n_test_anomalous = dn_anom if n_test_anomalous is None else n_test_anomalous
    plan: list[tuple[str, str | None]] = [("train", None)] * n_train + [("test", None)] * n_test_normal
    return plan + [("test", lesion_kinds[i % len(lesion_kinds)]) for i in range(n_test_anomalous)]
