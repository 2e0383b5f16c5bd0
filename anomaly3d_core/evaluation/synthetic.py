"""Synthetic lesions for validation: kinds, sizes and contrasts unlike the demo's test lesions.

A validation set that predicts the test must not share the test's lesions (the demo's tumour,
infarct, MS and haemorrhage replace tissue by a fixed intensity inside a sharp-edged blob). These
lesions are defined in world coordinates (mm) and change each sequence's intensity *relative to
the tissue it lies in* (``I' = I (1 + c p)``, ``p`` a soft ellipsoid profile), so one lesion lands at
the same place on every sequence's own grid, with each sequence's own contrast and partial volume:

* ``focus``: one small focus, 1.5-4 mm radius (10-80 % change);
* ``cluster``: 3-6 small foci within 15 mm (15-80 %);
* ``diffuse``: one large, very soft change, 8-16 mm radius (8-40 %);
* ``patchy``: a 5-10 mm region whose change is modulated by smooth texture (20-80 %).

Each change is drawn log-uniformly within its kind's range, so faint lesions are as common as
strong ones: a validation of only faint changes (the first version: at most 50 %, 30 % in T1w)
scored every autoencoder route near zero and could not rank them.

The sign per sequence follows MRI physics most of the time (FLAIR, T2w: brighter with
probability 0.9; T1w: darker with probability 0.75; other suffixes: either) and the size of the
change is scaled per sequence (FLAIR 1, T2w 0.9, T1w 0.75: lesions are fainter in T1w).
The ground truth is ``p > 0.5`` on the reference grid, inside the reference's foreground.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from anomaly3d_core.io.volume import Volume

KINDS: tuple[str, ...] = ("focus", "cluster", "diffuse", "patchy")
#: probability that a lesion is brighter than its tissue, per BIDS suffix (default 0.5)
BRIGHT_PROBABILITY: dict[str, float] = {"FLAIR": 0.9, "T2w": 0.9, "T1w": 0.25}
#: how strongly each sequence shows a change (default 1)
SEQUENCE_GAIN: dict[str, float] = {"FLAIR": 1.0, "T2w": 0.9, "T1w": 0.75}
#: (low, high) relative change per kind, drawn log-uniformly
MAGNITUDE: dict[str, tuple[float, float]] = {
    "focus": (0.1, 0.8),
    "cluster": (0.15, 0.8),
    "diffuse": (0.08, 0.4),
    "patchy": (0.2, 0.8),
}


@dataclass
class Focus:
    """One soft ellipsoid: centre and radii in mm, edge softness (fraction of the radius)."""

    centre_mm: np.ndarray
    radii_mm: np.ndarray
    softness: float
    texture_seed: int | None = None


@dataclass
class Lesion:
    """A synthetic lesion: its foci, its kind and the relative change per sequence."""

    kind: str
    foci: list[Focus]
    change: dict[str, float] = field(default_factory=dict)


def _profile(
    shape: tuple[int, ...], affine: np.ndarray, focus: Focus
) -> tuple[tuple[slice, ...], np.ndarray]:
    """The focus's profile ``p`` in [0, 1] on the bounding box (slices) of ``shape`` it reaches."""
    inv = np.linalg.inv(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    centre = inv[:3, :3] @ focus.centre_mm + inv[:3, 3]
    reach = 2.0 * focus.radii_mm.max() / spacing
    lo = np.maximum(0, np.floor(centre - reach).astype(int))
    hi = np.minimum(shape, np.ceil(centre + reach).astype(int) + 1)
    if np.any(hi <= lo):
        return tuple(slice(0, 0) for _ in shape), np.zeros((0, 0, 0), np.float32)
    idx = np.meshgrid(
        *[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)], indexing="ij"
    )
    world = [sum(affine[r, c] * idx[c] for c in range(3)) + affine[r, 3] for r in range(3)]
    dist = np.sqrt(
        sum(((w - c) / r) ** 2 for w, c, r in zip(world, focus.centre_mm, focus.radii_mm, strict=True))
    )
    p = 1.0 / (1.0 + np.exp((dist - 1.0) / max(focus.softness, 1e-3)))
    if focus.texture_seed is not None:  # smooth texture in [0.2, 1.8]
        rng = np.random.default_rng(focus.texture_seed)
        noise = ndimage.gaussian_filter(rng.standard_normal(p.shape), 2.0 / max(spacing.min(), 0.5))
        p = p * (1.0 + 0.8 * np.tanh(noise / (noise.std() + 1e-6)))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)), p.astype(np.float32)


def draw_lesion(
    reference: Volume, sequences: list[str], rng: np.random.Generator, kind: str | None = None
) -> Lesion:
    """A random lesion of ``kind`` (random when None) centred in the reference scan's foreground, away from its edge."""
    kind = kind or str(rng.choice(KINDS))
    fg = reference.array if reference.array.ndim == 3 else reference.array[..., 0]
    fg = fg != 0
    spacing = np.asarray(reference.spacing, dtype=float)
    depth = ndimage.distance_transform_edt(np.pad(fg, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    if kind == "focus":
        radii, softness = [rng.uniform(1.5, 4.0, 3)], 0.2
    elif kind == "cluster":
        radii, softness = [rng.uniform(1.5, 3.0, 3) for _ in range(int(rng.integers(3, 7)))], 0.2
    elif kind == "diffuse":
        radii, softness = [rng.uniform(8.0, 16.0, 3)], 0.35
    elif kind == "patchy":
        radii, softness = [rng.uniform(5.0, 10.0, 3)], 0.25
    else:
        raise ValueError(f"unknown synthetic lesion kind '{kind}'; available: {', '.join(KINDS)}")
    low, high = MAGNITUDE[kind]
    magnitude = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    margin = float(np.max(radii[0])) + 3.0
    inside = np.argwhere(depth > margin)
    if not len(inside):
        inside = np.argwhere(depth >= depth.max())
    centre_vox = inside[rng.integers(len(inside))]
    centre = reference.affine[:3, :3] @ centre_vox + reference.affine[:3, 3]
    foci = []
    for i, r in enumerate(radii):
        offset = np.zeros(3) if i == 0 else rng.uniform(-12.0, 12.0, 3)
        seed = int(rng.integers(1 << 30)) if kind == "patchy" else None
        foci.append(Focus(centre + offset, np.asarray(r, float), softness, seed))
    change = {}
    for seq in sequences:
        bright = rng.random() < BRIGHT_PROBABILITY.get(seq, 0.5)
        gain = SEQUENCE_GAIN.get(seq, 1.0)
        change[seq] = float((1 if bright else -1) * magnitude * gain)
    return Lesion(kind, foci, change)


def apply_lesions(volume: Volume, lesions: list[Lesion], sequence: str) -> Volume:
    """``volume`` (one sequence, its own grid) with every lesion's relative change for ``sequence``."""
    array = np.array(volume.array, dtype=np.float32, copy=True)
    factor = np.ones(array.shape, np.float32)
    for lesion in lesions:
        for focus in lesion.foci:
            box, p = _profile(array.shape, volume.affine, focus)
            if p.size:
                factor[box] *= 1.0 + lesion.change.get(sequence, 0.0) * np.minimum(p, 1.8)
    return Volume(array * np.maximum(factor, 0.0), volume.affine, volume.path, dict(volume.meta))


def lesion_mask(reference: Volume, lesions: list[Lesion]) -> np.ndarray:
    """Ground truth on the reference grid: profile above one half, inside the reference's foreground."""
    fg = (reference.array if reference.array.ndim == 3 else reference.array[..., 0]) != 0
    mask = np.zeros(fg.shape, bool)
    for lesion in lesions:
        for focus in lesion.foci:
            box, p = _profile(fg.shape, reference.affine, focus)
            if p.size:
                mask[box] |= p > 0.5
    return mask & fg


def corrupt_subject(
    volumes: Mapping[str, Volume], rng: np.random.Generator, n_lesions: tuple[int, int] = (1, 3)
) -> tuple[dict[str, Volume], np.ndarray, list[Lesion]]:
    """A subject's sequences (first = reference) with 1-3 synthetic lesions, the truth on the reference grid."""
    names = list(volumes)
    reference = volumes[names[0]]
    lesions = [
        draw_lesion(reference, names, rng) for _ in range(int(rng.integers(n_lesions[0], n_lesions[1] + 1)))
    ]
    out = {name: apply_lesions(vol, lesions, name) for name, vol in volumes.items()}
    mask = lesion_mask(reference, lesions)
    if not mask.any():  # a lesion too small for the grid: widen the first one until it shows
        lesions[0].foci[0].radii_mm = np.maximum(
            lesions[0].foci[0].radii_mm, 2.0 * np.asarray(reference.spacing)
        )
        out = {name: apply_lesions(vol, lesions, name) for name, vol in volumes.items()}
        mask = lesion_mask(reference, lesions)
    return out, mask, lesions


__all__ = ["KINDS", "MAGNITUDE", "Lesion", "apply_lesions", "corrupt_subject", "draw_lesion", "lesion_mask"]
