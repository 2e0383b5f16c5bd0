"""MRI contrasts for the multi-sequence demo: T1w, T2w and FLAIR images of one anatomy, lesions per sequence.

T1w is the MNI152 T1 template (as in the single-sequence demo). T2w and FLAIR are mixed from tissue
maps: grey and white matter from nilearn's MNI152 maps, CSF = brain mask minus both (nilearn ships
no CSF map). Levels are relative to normal white matter of that sequence: T2w has bright CSF and
grey matter brighter than white matter; FLAIR suppresses CSF.

A lesion is a set of disjoint *parts* (geometry shared by all sequences) and a contrast per part
and sequence:

* ``ms``: 4-8 small white-matter plaques; in T1w between grey and white matter (subtler than the
  single-sequence demo's 0.45-0.6), bright in T2w and FLAIR.
* ``infarct``: a cortical/subcortical region; dark in T1w, bright in T2w (near CSF) and FLAIR.
* ``tumour``: necrotic core and enhancing rim as in the single-sequence demo, plus a vasogenic
  oedema (2-5 mm, mostly white matter) that scales local intensity: slightly dark in T1w, clearly
  bright in T2w and FLAIR, so FLAIR shows the lesion wider than T1w.
* ``haemorrhage``: a late-subacute haematoma (extracellular methaemoglobin): bright in T1w, T2w and
  FLAIR, with a thin haemosiderin rim that is dark in T2w and FLAIR and near-normal in T1w.

Ground truth is the union of all parts: everything abnormal in any sequence (so a tumour's mask
includes its oedema, which T1w alone barely shows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomaly3d_core.demo.anatomy import LESION_KINDS, _blob, _pick_centre
from anomaly3d_core.demo.native import _smooth
from anomaly3d_core.errors import ConfigError, did_you_mean

SEQUENCES: tuple[str, ...] = ("T1w", "T2w", "FLAIR")

#: tissue intensity relative to white matter, per sequence (T1w comes from the template instead)
TISSUE_LEVELS: dict[str, dict[str, float]] = {
    "T2w": {"wm": 1.0, "gm": 1.4, "csf": 3.2},
    "FLAIR": {"wm": 1.0, "gm": 1.25, "csf": 0.2},
}
#: a smooth random field drawn coarse and interpolated: fast on whole volumes
smooth_field = functools.partial(_smooth, coarse=4)
TISSUE_SD = 0.06  # subject-to-subject variation of the grey-matter and CSF levels (relative)

#: (low, high) intensity of a lesion part, relative to the sequence's normal white matter
LESION_LEVELS: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "ms": {"plaque": {"T1w": (0.7, 0.85), "T2w": (1.45, 1.85), "FLAIR": (1.4, 1.75)}},
    "infarct": {"core": {"T1w": (0.25, 0.4), "T2w": (2.2, 2.8), "FLAIR": (1.5, 1.9)}},
    "tumour": {
        "core": {"T1w": (0.35, 0.55), "T2w": (2.2, 2.8), "FLAIR": (1.1, 1.4)},
        "rim": {"T1w": (1.25, 1.45), "T2w": (1.3, 1.6), "FLAIR": (1.3, 1.6)},
    },
    "haemorrhage": {
        "core": {"T1w": (1.4, 1.7), "T2w": (1.6, 2.0), "FLAIR": (1.5, 1.9)},
        "rim": {"T1w": (0.9, 1.0), "T2w": (0.35, 0.55), "FLAIR": (0.45, 0.65)},
    },
}
#: oedema multiplies the local intensity (it lies over white and some grey matter)
OEDEMA_FACTOR: dict[str, tuple[float, float]] = {"T1w": (0.85, 0.93), "T2w": (1.5, 1.8), "FLAIR": (1.5, 1.8)}


@dataclass(frozen=True)
class Tissues:
    """One subject's warped template: T1 image, tissue probabilities and brain mask."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray

    @property
    def csf(self) -> np.ndarray:
        return np.clip(self.brain.astype(np.float32) - self.gm - self.wm, 0.0, 1.0)


def check_sequences(sequences: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``sequences`` as a tuple, each one known and none repeated."""
    if not sequences:
        raise ConfigError(f"sequences: at least one is needed; available: {', '.join(SEQUENCES)}")
    for s in sequences:
        if s not in SEQUENCES:
            raise ConfigError("sequences: " + did_you_mean(s, SEQUENCES, "sequence"))
    if len(set(sequences)) != len(sequences):
        raise ConfigError(f"sequences: {list(sequences)} names a sequence twice")
    return tuple(sequences)


def lesion_parts(
    tissues: Tissues, kind: str, rng: np.random.Generator, voxel_size: float
) -> dict[str, np.ndarray]:
    """Disjoint boolean masks of the parts of one lesion of ``kind`` (geometry only)."""
    brain, gm, wm = tissues.brain, tissues.gm, tissues.wm
    shape = brain.shape
    scale = 2.0 / voxel_size  # radii below are in 2 mm voxels
    inner = ndimage.binary_erosion(brain, iterations=max(1, int(round(6 * scale))))
    wm_region = (wm > 0.6) & inner
    gm_region = (gm > 0.5) & ndimage.binary_erosion(brain, iterations=max(1, int(round(2 * scale))))
    if kind == "ms":
        plaque = np.zeros(shape, dtype=bool)
        region = wm_region if wm_region.any() else inner
        for _ in range(int(rng.integers(4, 9))):
            plaque |= _blob(shape, _pick_centre(region, rng), rng.uniform(1.5, 3.0, 3) * scale, rng, 0.2)
        return {"plaque": plaque & brain}
    if kind == "infarct":
        region = gm_region if gm_region.any() else inner
        return {"core": _blob(shape, _pick_centre(region, rng), rng.uniform(4, 7, 3) * scale, rng) & brain}
    if kind == "tumour":
        mass = _blob(shape, _pick_centre(inner, rng), rng.uniform(5, 9, 3) * scale, rng) & brain
        core = ndimage.binary_erosion(mass, iterations=max(1, int(round(2 * scale))))
        # oedema: 1-2.5 voxels (2-5 mm) beyond the mass with an irregular front, mostly in white matter
        distance = ndimage.distance_transform_edt(~mass)
        reach = rng.uniform(1.0, 2.5) * scale * (1.0 + 0.4 * smooth_field(shape, rng, control=6))
        oedema = (distance > 0) & (distance <= reach) & brain & (wm > 0.3)
        return {"core": core, "rim": mass & ~core, "oedema": oedema}
    if kind == "haemorrhage":
        mass = _blob(shape, _pick_centre(inner, rng), rng.uniform(3, 6, 3) * scale, rng) & brain
        core = ndimage.binary_erosion(mass, iterations=max(1, int(round(0.5 * scale))))
        return {"core": core, "rim": mass & ~core}
    raise ConfigError("lesion kind: " + did_you_mean(kind, LESION_KINDS, "lesion kind"))


def normal_image(tissues: Tissues, sequence: str, rng: np.random.Generator, contrast_sd: float) -> np.ndarray:
    """The lesion-free image of ``sequence``, with this subject's own tissue contrast."""
    if sequence == "T1w":
        contrast_gm, contrast_wm = np.clip(rng.normal(0, contrast_sd, 2), -0.3, 0.3)
        return (tissues.t1 * (1 + contrast_gm * tissues.gm + contrast_wm * tissues.wm)).astype(np.float32)
    levels = TISSUE_LEVELS[sequence]
    gm_level, csf_level = (
        levels[t] * (1.0 + float(np.clip(rng.normal(0, TISSUE_SD), -0.2, 0.2))) for t in ("gm", "csf")
    )
    image = tissues.wm * levels["wm"] + tissues.gm * gm_level + tissues.csf * csf_level
    # fine structure the tissue maps lack (myelination, iron): a few percent, smooth
    image *= 1.0 + 0.03 * smooth_field(image.shape, rng, control=12)
    return np.where(tissues.brain, image, 0.0).astype(np.float32)


def add_lesion_contrast(
    image: np.ndarray,
    tissues: Tissues,
    kind: str,
    parts: dict[str, np.ndarray],
    sequence: str,
    rng: np.random.Generator,
    voxel_size: float,
) -> np.ndarray:
    """``image`` with the lesion ``parts`` drawn in the contrast of ``sequence``, with soft borders."""
    scale = 2.0 / voxel_size
    wm = tissues.wm
    wm_level = float(np.median(image[wm > 0.8])) if (wm > 0.8).any() else float(image[tissues.brain].mean())
    union = np.zeros(image.shape, dtype=bool)
    target = image.copy()
    for name, mask in parts.items():
        if name == "oedema":
            target[mask] = image[mask] * rng.uniform(*OEDEMA_FACTOR[sequence])
        else:
            target[mask] = wm_level * rng.uniform(*LESION_LEVELS[kind][name][sequence])
        union |= mask
    if not union.any():
        return image
    # partial volume: the border voxels just outside blend towards the nearest lesion voxel
    nearest = ndimage.distance_transform_edt(~union, return_distances=False, return_indices=True)
    target = target[tuple(nearest)]
    weight = np.clip(ndimage.gaussian_filter(union.astype(np.float32), 0.7 * scale), 0, 1)
    weight = np.where(union, np.maximum(weight, 0.8), weight * 0.5)
    texture = 1.0 + 0.05 * smooth_field(image.shape, rng, control=8)
    return ((1 - weight) * image + weight * target * texture).astype(np.float32)
