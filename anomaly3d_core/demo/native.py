"""Native-space demo data: the synthetic brains of :mod:`.datasets` as a multi-site study acquires them.

Each subject is first built in template space (MNI152, ``source_voxel_size`` mm) with a stronger
smooth deformation (about 3.5 mm RMS per axis) and stronger grey/white-matter contrast variation
than the template-space demo, and its lesion is inserted there. The scan is then resampled, with
its lesion mask, through a random head pose onto a random native grid, so anatomy and lesion stay
consistent:

* head pose: rotation up to ±15° about each axis, translation up to ±15 mm, head size ±10 % per axis;
* voxel sizes from 1 to 2 mm: isotropic, 1×1×2.5 mm thick slices or 1.2×1.2×2 mm;
* axial, coronal or sagittal stacks stored in any axis order with any flips; the affine is kept
  correct, so ``nibabel.as_closest_canonical`` shows the right anatomy;
* each scan's own field of view: a random margin around the head, sometimes cutting into it
  (never into the lesion);
* scanner effects on the native grid: a gamma contrast change, a stronger bias field, Rician
  noise that grows as the voxels shrink, and arbitrary intensity units (a factor 50..3000 plus an
  offset inside the brain; stored as int16 or float32). The background stays exactly zero
  (skull-stripped scans).

Ground-truth masks are written on each scan's own grid, voxel for voxel. Output is deterministic
for a seed. Layout as :func:`.datasets.make_demo_dataset`, and ``manifest.csv`` has extra columns
(``voxel_size``, ``axcodes``, ``stack``, ``intensity_scale``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from anomaly3d_core.demo.anatomy import LESION_KINDS, Atlas, add_lesion, mni_atlas, subject_plan
from anomaly3d_core.io.files import save_nifti
from anomaly3d_core.preprocess.augmentation import smooth_field
from anomaly3d_core.progress import progress

#: acquisition protocols: (in-plane voxel size, slice thickness) in mm, ``None`` = isotropic, drawn 1..2 mm
PROTOCOLS: tuple[tuple[float, float] | None, ...] = ((1.0, 1.0), None, None, (1.0, 2.5), (1.2, 2.0))
STACKS = {"sagittal": 0, "coronal": 1, "axial": 2}  # the world (RAS) axis the slices are stacked along
MAX_ROTATION_DEG = 15.0
MAX_SHIFT_MM = 15.0
MAX_SCALE = 0.10
DEFORM_MM = 3.5  # RMS displacement per axis of the smooth anatomical deformation
CONTRAST_SD = 0.12  # grey/white-matter contrast variation (template-space demo: 0.06)
GAMMA = (0.75, 1.35)  # intensity gamma range
BIAS_STRENGTH = (0.12, 0.3)  # bias field exp(strength * field), field about ±1 (template-space demo: 0.12)
NOISE_AT_2MM = (0.012, 0.022)  # Rician noise sigma at 2 mm isotropic, fraction of the 99th percentile ...
NOISE_VOXEL_EXPONENT = 0.5  # ... growing as (8 mm³ / voxel volume) ** exponent for smaller voxels


@dataclass
class NativeSubject:
    """One native scan: ``image`` and ``mask`` share ``affine`` (voxel indices to RAS+ mm)."""

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    rot = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    return rot


def _smooth(shape: tuple[int, ...], rng: np.random.Generator, control: int, coarse: int = 6) -> np.ndarray:
    """:func:`smooth_field` drawn on a grid ``coarse`` times coarser and interpolated (fast on large grids)."""
    coarse_shape = tuple(max(control + 1, -(-n // coarse)) for n in shape)
    small = smooth_field(coarse_shape, rng, control=control)
    zoom = [(n - 1) / max(c - 1, 1) for n, c in zip(shape, coarse_shape, strict=True)]
    full = ndimage.zoom(small, zoom, order=1, mode="nearest", grid_mode=False)
    if full.shape != tuple(shape):  # zoom may round a size down by one
        pad = [(0, max(0, n - f)) for n, f in zip(shape, full.shape, strict=True)]
        full = np.pad(full, pad, mode="edge")[tuple(slice(0, n) for n in shape)]
    return full.astype(np.float32, copy=False)


def _deform(arrays: list[np.ndarray], rng: np.random.Generator, rms_voxels: float) -> list[np.ndarray]:
    """A smooth random deformation (``rms_voxels`` RMS displacement per axis) applied to all ``arrays``."""
    shape = arrays[0].shape
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        disp = _smooth(shape, rng, control=5, coarse=3)
        coords[axis] += (rms_voxels / max(float(disp.std()), 1e-6)) * disp
    return [
        ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
        for a in arrays
    ]


def template_subject(
    atlas: Atlas, rng: np.random.Generator, lesion_kind: str | None, voxel_size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, brain mask and lesion mask in template space, before any scanner effect."""
    contrast_gm, contrast_wm = np.clip(rng.normal(0, CONTRAST_SD, 2), -0.3, 0.3)
    t1, gm, wm, brain = _deform(
        [atlas.t1, atlas.gm, atlas.wm, atlas.mask.astype(np.float32)], rng, DEFORM_MM / voxel_size
    )
    brain = brain > 0.5
    image = t1 * (1 + contrast_gm * gm + contrast_wm * wm)
    lesion = np.zeros(image.shape, dtype=bool)
    if lesion_kind is not None:
        image, lesion = add_lesion(image, brain, gm, wm, lesion_kind, rng, voxel_size)
    image = np.where(brain, image, 0.0).astype(np.float32)
    return image, brain, lesion & brain


def _pose(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """Template world -> scanner world: scale and rotate the head about ``centre``, then shift it."""
    linear = _rotation(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)) @ np.diag(
        rng.uniform(1 - MAX_SCALE, 1 + MAX_SCALE, 3)
    )
    pose = np.eye(4)
    pose[:3, :3] = linear
    pose[:3, 3] = centre + rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3) - linear @ centre
    return pose


def _world_points(mask: np.ndarray, affine: np.ndarray, step: int = 2) -> np.ndarray:
    idx = np.argwhere(mask[::step, ::step, ::step]) * step
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _native_grid(
    rng: np.random.Generator,
    brain_pts: np.ndarray,
    lesion_pts: np.ndarray,
    protocols: tuple[tuple[float, float] | None, ...] = PROTOCOLS,
) -> tuple[np.ndarray, tuple[int, int, int], dict[str, Any]]:
    """A random scanner grid around the head: voxel size (one of ``protocols``), stack, axis order,
    flips, field of view."""
    protocol = protocols[int(rng.integers(len(protocols)))]
    if protocol is None:
        in_plane = thickness = float(np.round(rng.uniform(1.0, 2.0), 1))
    else:
        in_plane, thickness = protocol
    stack = list(STACKS)[int(rng.integers(3))]
    slice_axis = STACKS[stack]
    spacing = np.full(3, in_plane)
    spacing[slice_axis] = thickness
    # field of view (world, RAS): a margin on each side; sometimes one side cuts into the head
    lo, hi = brain_pts.min(0), brain_pts.max(0)
    margins = rng.uniform(2.0, 25.0, (2, 3))
    if rng.random() < 0.35:
        margins[int(rng.integers(2)), int(rng.integers(3))] = -rng.uniform(2.0, 12.0)
    lo, hi = lo - margins[0], hi + margins[1]
    if len(lesion_pts):  # never cut the lesion
        lo = np.minimum(lo, lesion_pts.min(0) - 6.0)
        hi = np.maximum(hi, lesion_pts.max(0) + 6.0)
    n_world = np.ceil((hi - lo) / spacing).astype(int) + 1
    # array axis order: usually the slices last (as a DICOM stack), sometimes any order; any flips
    if rng.random() < 0.7:
        others = [a for a in range(3) if a != slice_axis]
        order = [*rng.permutation(others).tolist(), slice_axis]
    else:
        order = rng.permutation(3).tolist()
    flips = np.where(rng.random(3) < 0.5, -1.0, 1.0)
    affine = np.eye(4)
    for j, (axis, sign) in enumerate(zip(order, flips, strict=True)):
        affine[:3, j] = 0.0
        affine[axis, j] = sign * spacing[axis]
        affine[axis, 3] = lo[axis] if sign > 0 else lo[axis] + (n_world[axis] - 1) * spacing[axis]
    shape = tuple(int(n_world[a]) for a in order)
    info = {
        "voxel_size": "x".join(f"{spacing[a]:g}" for a in order),
        "axcodes": "".join(nib.aff2axcodes(affine)),
        "stack": stack,
    }
    return affine, shape, info  # type: ignore[return-value]


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field over the field of view."""
    return np.exp(strength * _smooth(shape, rng, control=3, coarse=8))


def make_native_subject(
    atlas: Atlas,
    rng: np.random.Generator,
    lesion_kind: str | None = None,
    source_voxel_size: float = 2.0,
) -> NativeSubject:
    """One native-space scan with its lesion mask on the same grid (empty for a normal subject)."""
    image, brain, lesion = template_subject(atlas, rng, lesion_kind, source_voxel_size)
    centre = atlas.affine[:3, :3] @ np.argwhere(atlas.mask).mean(0) + atlas.affine[:3, 3]
    pose = _pose(rng, centre)
    to_scanner = pose @ atlas.affine
    brain_pts = _world_points(brain, to_scanner)
    lesion_pts = _world_points(lesion, to_scanner, step=1) if lesion.any() else np.zeros((0, 3))
    affine, shape, info = _native_grid(rng, brain_pts, lesion_pts)
    # native voxel -> template voxel, one affine: resample image, brain and lesion through it
    m = np.linalg.inv(to_scanner) @ affine

    def resample(a: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            a.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=1, cval=0.0
        )

    nat_brain = resample(brain) > 0.5
    nat_lesion = (resample(lesion) > 0.5) & nat_brain
    nat, effects = scanner_effects(resample(image), nat_brain, affine, rng)
    info.update(effects, pose=pose.tolist())  # pose: template world -> scanner world
    return NativeSubject(nat, nat_lesion, affine, info)


def scanner_effects(
    nat: np.ndarray, nat_brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Gamma, bias field, Rician noise and intensity units of one scanner, on a native grid."""
    shape = nat.shape
    ref = float(np.percentile(nat[nat_brain], 99))
    gamma = float(rng.uniform(*GAMMA))
    nat = ref * np.power(np.maximum(nat, 0.0) / ref, gamma)
    nat *= _bias_field(shape, rng, float(rng.uniform(*BIAS_STRENGTH)))
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    sigma = float(rng.uniform(*NOISE_AT_2MM)) * (8.0 / voxel_volume) ** NOISE_VOXEL_EXPONENT * ref
    noise = rng.standard_normal((2, *shape), dtype=np.float32) * np.float32(sigma)
    nat = np.sqrt((nat + noise[0]) ** 2 + noise[1] ** 2)
    scale = float(np.exp(rng.uniform(np.log(50.0), np.log(3000.0))))
    offset = scale * float(rng.uniform(0.05, 0.3))
    nat = np.where(nat_brain, nat * scale + offset, 0.0)
    if rng.random() < 0.75 and float(nat.max()) < 32000:
        nat = np.round(nat).astype(np.int16)
    else:
        nat = nat.astype(np.float32)
    effects = {
        "intensity_scale": round(scale, 1),
        "gamma": round(gamma, 3),
        "noise_sigma": round(float(sigma * scale), 2),
        "dtype": str(nat.dtype),
        "shape": "x".join(str(n) for n in shape),
    }
    return nat, effects


def make_native_dataset(
    out: str | Path,
    size: str = "small",
    seed: int = 0,
    lesion_kinds: tuple[str, ...] = LESION_KINDS,
    source_voxel_size: float = 2.0,
    n_train: int | None = None,
    n_test_normal: int | None = None,
    n_test_anomalous: int | None = None,
) -> Path:
    """Write the native-space demo set (layout as :func:`.datasets.make_demo_dataset`) and return ``out``."""
    plan = subject_plan(size, lesion_kinds, n_train, n_test_normal, n_test_anomalous)
    out = Path(out)
    atlas = mni_atlas(source_voxel_size)
    rows = []
    test_index = 100
    for i, (split, kind) in enumerate(progress(plan, desc="native demo subjects", total=len(plan))):
        # a stream of its own: native subject i shares no draws with template-space subject i
        subject = make_native_subject(atlas, np.random.default_rng([seed, i, 1]), kind, source_voxel_size)
        if split == "train":
            name = f"sub-{i:03d}.nii.gz"
        else:
            name = f"sub-{test_index:03d}.nii.gz"
            test_index += 1
            save_nifti(subject.mask.astype(np.uint8), subject.affine, out / "test_masks" / name)
        save_nifti(subject.image, subject.affine, out / split / name)
        rows.append(
            {
                "file": f"{split}/{name}",
                "split": split,
                "label": int(kind is not None),
                "lesion_kind": kind or "",
                "voxel_size": subject.info["voxel_size"],
                "axcodes": subject.info["axcodes"],
                "stack": subject.info["stack"],
                "intensity_scale": subject.info["intensity_scale"],
            }
        )
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file", "split", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return out
