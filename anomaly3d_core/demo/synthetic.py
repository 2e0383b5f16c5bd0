"""Synthetic anomalies injected into normal scans, for tuning when no labelled scans exist."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.augmentation import smooth_field


def inject_anomalies(
    volume: Volume,
    rng: np.random.Generator,
    n_lesions: tuple[int, int] = (1, 3),
    radius_mm: tuple[float, float] = (4.0, 10.0),
    contrast: tuple[float, float] = (0.2, 0.5),
) -> tuple[Volume, np.ndarray]:
    """Blobs inside the foreground, each darker or brighter than the scan's normal intensity range.

    With ``lo, hi`` the 1st and 99th foreground percentiles and ``span = hi - lo``, a bright blob
    gets ``hi + c * span`` and a dark one ``lo + (0.3 - c / 2) * span`` for ``c`` drawn from
    ``contrast``; defined on the range, so it works for MRI and CT intensities alike.

    Shapes are ellipsoids with smoothly perturbed borders, sized in millimetres so the result
    does not depend on the voxel size. Returns the new volume and its ground-truth mask.
    """
    arr = np.asarray(volume.array, dtype=np.float32)
    ref = volume.channel(0)  # a subject's sequences get the same blobs, each on its own intensity range
    fg = np.abs(ref) > 1e-6 * float(np.abs(ref).max())
    inner = ndimage.binary_erosion(fg, iterations=2) if fg.sum() > 1000 else fg
    spacing = np.asarray(volume.spacing)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in ref.shape], indexing="ij")
    mask = np.zeros(ref.shape, bool)
    out = arr.copy()
    channels = [out] if out.ndim == 3 else [out[..., c] for c in range(out.shape[3])]
    ranges = [tuple(float(v) for v in np.percentile(ch[fg], [1, 99])) for ch in channels]
    candidates = np.argwhere(inner)
    for _ in range(int(rng.integers(n_lesions[0], n_lesions[1] + 1))):
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(*radius_mm, 3) / spacing
        dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))
        blob = (dist < 1.0 + 0.3 * smooth_field(ref.shape, rng, control=6)) & fg
        if not blob.any():
            continue
        c = rng.uniform(*contrast)
        bright = rng.random() < 0.5
        noise = 1.0 + 0.05 * rng.standard_normal(int(blob.sum()))
        for ch, (lo, hi) in zip(channels, ranges, strict=True):  # views into ``out``
            target = hi + c * (hi - lo) if bright else lo + (0.3 - c / 2) * (hi - lo)
            ch[blob] = 0.2 * ch[blob] + 0.8 * target * noise
        mask |= blob
    return Volume(out, volume.affine.copy(), volume.path, dict(volume.meta)), mask
