"""Synthetic anomalies for training and validating a detector on normal scans only.

:func:`corrupt` changes a few small regions ("foci") of a normal array and returns the changed
array with a per-voxel target in [0, 1]: how much of each voxel is foreign. It works on a crop or a
whole preprocessed volume, with one channel per sequence (``(C, X, Y, Z)``):

- **shapes**: ellipsoids with a wobbly surface, radii from below one voxel to ``radius_range[1]``,
  with a blurred (partial-volume) edge, inside the foreground only; ``1..max_foci`` per sample;
- **kinds** (each focus picks one):
  ``foreign``: a patch of another subject blended in at a random factor α (Tan et al. 2020);
  ``intensity``: the tissue replaced by a smooth level ``f`` times the local intensity, with some
  texture (f below or above 1: darker or brighter, relative to the tissue it replaces);
  ``texture``: the tissue's fine structure blurred away or roughened, at the same mean level;
  ``ring``: a bright rim around a dark core (or the reverse);
- **sequences**: every channel changes in the same region; the direction of an intensity change
  follows the sequence's physics (``FLAIR``/``T2w`` brighter, ``T1w`` mostly darker, see
  :data:`SEQUENCE_SIGNS`).

:func:`normal_variation` adds what a detector must ignore: a smooth bias field, a gamma change,
noise and blur, on the whole sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: kinds of synthetic anomaly :func:`corrupt` makes
KINDS = ("foreign", "intensity", "texture", "ring")
#: probability that an intensity change makes a sequence darker (others: brighter); unknown: 0.5
SEQUENCE_SIGNS: dict[str, float] = {"T1w": 0.8, "T1": 0.8, "T2w": 0.1, "FLAIR": 0.05, "PDw": 0.3}


@dataclass(frozen=True)
class CorruptionSpec:
    """What :func:`corrupt` draws from (see the module docstring)."""

    kinds: tuple[str, ...] = ("foreign", "intensity")
    max_foci: int = 4
    radius_range: tuple[float, float] = (0.6, 8.0)
    change_range: tuple[float, float] = (0.15, 0.8)
    edge_sigma: tuple[float, float] = (0.3, 1.2)
    clean_fraction: float = 0.2
    visible_change: float = 0.3

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"corruption kinds {list(self.kinds)}: each must be one of {list(KINDS)}")


def _channels_first(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 3 else array


def focus_weight(
    shape: tuple[int, int, int],
    centre: np.ndarray,
    radii: np.ndarray,
    edge: float,
    rng: np.random.Generator,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """A soft blob in [0, 1] (a wobbly ellipsoid with a blurred edge) and the box it occupies."""
    reach = radii * 1.4 + 3 * edge + 1
    lo = np.maximum(0, np.floor(centre - reach).astype(int))
    hi = np.minimum(shape, np.ceil(centre + reach).astype(int) + 1)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    axes = [np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    dist = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, radii, strict=True)))
    sub = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    coarse = rng.uniform(-1, 1, (3, 3, 3)).astype(np.float32)
    wobble = ndimage.zoom(coarse, [s / 3 for s in sub], order=1)[: sub[0], : sub[1], : sub[2]]
    inside = (dist < 1.0 + rng.uniform(0.0, 0.35) * wobble).astype(np.float32)
    if not inside.any():  # a radius below one voxel: at least the centre voxel
        inside[tuple(np.clip(np.round(centre - lo).astype(int), 0, np.array(sub) - 1))] = 1.0
    return box, np.clip(ndimage.gaussian_filter(inside, edge) if edge > 0 else inside, 0.0, 1.0)


def _local_level(x: np.ndarray, fg: np.ndarray, background: float, sigma: float) -> np.ndarray:
    """Smoothed intensity above the background within the foreground (normalised convolution): the
    tissue level a change is relative to, not lowered next to the brain's edge."""
    weight = ndimage.gaussian_filter(fg, sigma)
    level = ndimage.gaussian_filter((x - background) * fg, sigma) / np.maximum(weight, 1e-3)
    return np.maximum(level, 0.0)


def _factor(rng: np.random.Generator, spec: CorruptionSpec, p_darker: float) -> float:
    change = rng.uniform(*spec.change_range)
    return 1.0 - change if rng.random() < p_darker else 1.0 + 1.5 * change


def corrupt(
    array: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    spec: CorruptionSpec,
    donor: np.ndarray | None = None,
    sequences: Sequence[str] = (),
    force: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt ``array`` (``(X, Y, Z)`` or ``(C, X, Y, Z)``) inside ``foreground``: ``(changed, target)``.

    ``donor`` (same shape) is another subject's array for ``foreign`` patches (without one, the
    array itself, mirrored, serves). ``sequences`` names the channels (for the sign of intensity
    changes). A fraction ``spec.clean_fraction`` of calls return the input unchanged with a zero
    target, unless ``force``. The target is zero outside the changed regions and outside
    ``foreground``.
    """
    x = _channels_first(np.asarray(array, dtype=np.float32)).copy()
    shape = x.shape[1:]
    target = np.zeros(shape, np.float32)
    fg_idx = np.flatnonzero(foreground)
    if fg_idx.size == 0 or (not force and rng.random() < spec.clean_fraction):
        return x.reshape(np.shape(array)), target
    backgrounds = [float(c[~foreground].min()) if (~foreground).any() else float(c.min()) for c in x]
    donor_x = _channels_first(np.asarray(donor, np.float32)) if donor is not None else x[:, ::-1, ::-1, ::-1]
    fg_soft = foreground.astype(np.float32)
    for _ in range(int(rng.integers(1, spec.max_foci + 1))):
        centre = np.array(np.unravel_index(fg_idx[rng.integers(fg_idx.size)], shape), np.float32)
        lo_r, hi_r = spec.radius_range
        radius = float(np.exp(rng.uniform(np.log(lo_r), np.log(hi_r))))
        radii = radius * rng.uniform(0.6, 1.4, 3)
        box, w = focus_weight(shape, centre, radii, float(rng.uniform(*spec.edge_sigma)), rng)
        w = w * fg_soft[box]
        kind = spec.kinds[int(rng.integers(len(spec.kinds)))]
        strength = _apply(kind, x, donor_x, box, w, fg_soft[box], rng, spec, backgrounds, sequences, radius)
        target[box] = np.maximum(target[box], w * strength)
    target[~foreground] = 0.0
    return x.reshape(np.shape(array)), np.clip(target, 0.0, 1.0)


def _apply(
    kind: str,
    x: np.ndarray,
    donor: np.ndarray,
    box: tuple[slice, ...],
    w: np.ndarray,
    fg: np.ndarray,
    rng: np.random.Generator,
    spec: CorruptionSpec,
    backgrounds: list[float],
    sequences: Sequence[str],
    radius: float,
) -> float:
    """Change ``x[:, box]`` in place by ``kind`` with weight ``w``; returns the target's strength.

    Every kind keeps the image's noise level (a blend of two noisy images is smoother than either,
    so fresh noise makes up the difference): otherwise the network learns to find smooth patches,
    which real lesions are not.
    """
    region_all = x[(slice(None), *box)]
    if kind == "foreign":
        alpha = float(rng.uniform(0.3, 1.0))
        shift = [int(rng.integers(-s // 4, s // 4 + 1)) for s in x.shape[1:]]
        src = np.roll(donor, shift, axis=(1, 2, 3))[(slice(None), *box)]
        a = alpha * w
        lost = np.sqrt(np.maximum(1.0 - a**2 - (1 - a) ** 2, 0.0))  # noise std lost by blending
        noise = rng.standard_normal(region_all.shape).astype(np.float32)
        sigma = np.array([_noise_sigma(c, fg) for c in region_all], np.float32)[:, None, None, None]
        x[(slice(None), *box)] = (1 - a) * region_all + a * src + lost * sigma * noise
        return alpha
    darker = rng.random()  # one draw: the sequences of a subject agree on the lesion's nature
    strengths = []
    for c in range(x.shape[0]):
        p_darker = SEQUENCE_SIGNS.get(sequences[c], 0.5) if c < len(sequences) else 0.5
        region = region_all[c]
        level = _local_level(region, fg, backgrounds[c], max(1.5, radius))
        fine = region - backgrounds[c] - _local_level(region, fg, backgrounds[c], 1.0)
        if kind == "intensity":  # the tissue replaced by f times its level, noise and fine grain kept
            f = _factor(rng, spec, 1.0 if darker < p_darker else 0.0)
            new = backgrounds[c] + f * level + fine * float(rng.uniform(0.8, 1.2))
            change = abs(f - 1.0)
        elif kind == "texture":  # same level, the fine grain smoothed away or roughened
            grain = ndimage.gaussian_filter(rng.standard_normal(region.shape).astype(np.float32), 0.8)
            grain *= 2.0 * _noise_sigma(region, fg) * float(rng.uniform(0.5, 2.0))
            new = backgrounds[c] + level + (grain if rng.random() < 0.5 else 0.0) + fine
            change = 0.5
        else:  # ring: a rim of one sign around a core of the other
            f_core = _factor(rng, spec, 1.0 if darker < p_darker else 0.0)
            f_rim = 2.0 - f_core
            core = np.clip((w - 0.6) / 0.4, 0.0, 1.0)
            new = backgrounds[c] + (core * f_core + (1 - core) * f_rim) * level + fine
            change = abs(f_core - 1.0)
        x[c][box] = (1 - w) * region + w * new
        strengths.append(min(1.0, change / spec.visible_change))
    return float(max(strengths))


def _noise_sigma(region: np.ndarray, fg: np.ndarray) -> float:
    """Robust noise level of a region: the MAD of its finest detail (differences along the last axis)."""
    d = np.diff(region, axis=-1)[fg[..., 1:] > 0.5]
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)) if d.size > 8 else 0.0


def normal_variation(array: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Acquisition variation a detector must ignore: bias field, gamma, noise, blur (each channel)."""
    x = _channels_first(np.asarray(array, dtype=np.float32)).copy()
    shape = x.shape[1:]
    for c in range(x.shape[0]):
        bg = float(x[c][~foreground].min()) if (~foreground).any() else float(x[c].min())
        v = x[c] - bg
        if rng.random() < 0.5:
            coarse = rng.uniform(-1, 1, (3, 3, 3)).astype(np.float32)
            field = ndimage.zoom(coarse, [s / 3 for s in shape], order=1)[: shape[0], : shape[1], : shape[2]]
            v = v * np.exp(rng.uniform(0.0, 0.25) * field)
        if rng.random() < 0.5:
            top = max(float(np.percentile(v, 99)), 1e-3)
            v = top * np.power(np.maximum(v, 0.0) / top, float(np.exp(rng.uniform(-0.3, 0.3))))
        if rng.random() < 0.3:
            v = ndimage.gaussian_filter(v, float(rng.uniform(0.3, 0.8)))
        if rng.random() < 0.5:
            v = v + rng.standard_normal(shape).astype(np.float32) * float(rng.uniform(0.0, 0.08)) * float(
                v.std()
            )
        x[c] = np.where(foreground, v + bg, x[c])
    return x.reshape(np.shape(array))
