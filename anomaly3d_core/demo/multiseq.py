"""Multi-sequence demo subjects (T1w, T2w, FLAIR of one anatomy), written as BIDS raw datasets.

A subject's anatomy (deformation, tissue maps, lesion geometry) is drawn once; each sequence then
gets its own tissue contrast, lesion contrast (:mod:`.contrasts`), bias field and noise from a
random stream of its own, so a sequence's image does not depend on which other sequences are
written. In ``space="native"`` every sequence also gets its own grid, as a protocol would: T1w
about 1 mm isotropic, T2w 0.8-1 mm in-plane with 2-3 mm slices, FLAIR 0.9-1 mm in-plane with
3-4 mm slices, each with its own stack direction, axis order, field of view and intensity units
(:mod:`.native`), and the head moves slightly between sequences (1-3°, 1-3 mm), so rigid
co-registration matters. The reference sequence (T1w when written, else the first) does not move;
the ground-truth mask lies on its grid.

Layout written by :func:`make_multiseq_dataset`::

    OUT/train/                      BIDS raw dataset of normal subjects for fitting
        dataset_description.json  README  participants.tsv  participants.json
        sub-000/anat/sub-000_T1w.nii.gz  sub-000_T1w.json  sub-000_FLAIR.nii.gz ...
    OUT/test/                       BIDS raw dataset of normal and lesioned subjects (sub-100 ...)
    OUT/test_masks/sub-100.nii.gz   ground truth on the reference sequence's grid
    OUT/manifest.csv                subject, split, label, lesion_kind (+ grids per sequence if native)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from anomaly3d_core.demo import bids, native
from anomaly3d_core.demo.anatomy import LESION_KINDS, Atlas, _warp, acquire, mni_atlas, subject_plan
from anomaly3d_core.demo.contrasts import (
    SEQUENCES,
    Tissues,
    add_lesion_contrast,
    check_sequences,
    lesion_parts,
    normal_image,
    smooth_field,
)
from anomaly3d_core.errors import ConfigError, did_you_mean
from anomaly3d_core.io.files import save_nifti
from anomaly3d_core.progress import progress

#: native acquisition protocols per sequence: (in-plane voxel size, slice thickness) in mm
NATIVE_PROTOCOLS: dict[str, tuple[tuple[float, float], ...]] = {
    "T1w": ((1.0, 1.0), (1.2, 1.2), (1.0, 1.2)),
    "T2w": ((0.8, 2.0), (1.0, 2.5), (0.9, 3.0)),
    "FLAIR": ((1.0, 3.0), (0.9, 4.0)),
}
MOTION_DEG = (1.0, 3.0)  # head rotation between sequences, about one random axis
MOTION_MM = (1.0, 3.0)  # head translation between sequences
TEMPLATE_CONTRAST_SD = 0.06  # as the single-sequence template-space demo
SPACES = ("template", "native")


@dataclass
class Scan:
    """One sequence of a subject: ``image`` on the grid ``affine`` (voxel indices to RAS+ mm)."""

    image: np.ndarray
    affine: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MultiSequenceSubject:
    """The scans of one subject by sequence, and its lesion mask on the ``reference`` scan's grid.

    ``tissues`` and the lesion's ``parts`` are on the template grid the subject was built on (the
    scans' own grid in template space).
    """

    scans: dict[str, Scan]
    mask: np.ndarray
    reference: str
    tissues: Tissues
    parts: dict[str, np.ndarray]


def reference_sequence(sequences: tuple[str, ...]) -> str:
    return "T1w" if "T1w" in sequences else sequences[0]


def _sequence_rng(key: tuple[int, ...], sequence: str) -> np.random.Generator:
    return np.random.default_rng([*key, 10 + SEQUENCES.index(sequence)])


def _tissues(atlas: Atlas, rng: np.random.Generator, voxel_size: float, space: str) -> Tissues:
    arrays = [atlas.t1, atlas.gm, atlas.wm, atlas.mask.astype(np.float32)]
    if space == "native":
        t1, gm, wm, brain = native._deform(arrays, rng, native.DEFORM_MM / voxel_size)
    else:
        t1, gm, wm, brain = _warp(arrays, rng, deform=2.0 * 2.0 / voxel_size, field=smooth_field)
    return Tissues(t1, gm, wm, brain > 0.5)


def _motion(rng: np.random.Generator, centre: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A small rigid head movement about ``centre`` (world mm): matrix, angle (°) and shift (mm)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = float(rng.uniform(*MOTION_DEG))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    theta = np.deg2rad(angle)
    rot = np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k  # Rodrigues
    direction = rng.normal(size=3)
    shift = float(rng.uniform(*MOTION_MM))
    motion = np.eye(4)
    motion[:3, :3] = rot
    motion[:3, 3] = centre + shift * direction / np.linalg.norm(direction) - rot @ centre
    return motion, angle, shift


def _resample(a: np.ndarray, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return ndimage.affine_transform(a.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=1)


def make_multiseq_subject(
    atlas: Atlas,
    key: tuple[int, ...],
    lesion_kind: str | None = None,
    sequences: tuple[str, ...] = SEQUENCES,
    voxel_size: float = 2.0,
    space: str = "template",
) -> MultiSequenceSubject:
    """One subject's scans of ``sequences`` and lesion mask; deterministic for ``key`` (seed integers).

    ``voxel_size`` is the template grid the anatomy is built on (the output grid in template space).
    """
    sequences = check_sequences(sequences)
    if space not in SPACES:
        raise ConfigError("space: " + did_you_mean(space, SPACES, "space"))
    rng = np.random.default_rng(key)
    tissues = _tissues(atlas, rng, voxel_size, space)
    parts = lesion_parts(tissues, lesion_kind, rng, voxel_size) if lesion_kind else {}
    lesion = np.zeros(tissues.brain.shape, dtype=bool)
    for part in parts.values():
        lesion |= part
    lesion &= tissues.brain
    sd = native.CONTRAST_SD if space == "native" else TEMPLATE_CONTRAST_SD
    reference = reference_sequence(sequences)
    if space == "native":
        centre = atlas.affine[:3, :3] @ np.argwhere(atlas.mask).mean(0) + atlas.affine[:3, 3]
        pose = native._pose(rng, centre)  # shared by all sequences: the head in the scanner
        head_centre = pose[:3, :3] @ centre + pose[:3, 3]
    scans: dict[str, Scan] = {}
    mask = lesion
    for sequence in sequences:
        srng = _sequence_rng(key, sequence)
        image = normal_image(tissues, sequence, srng, sd)
        if lesion_kind:
            image = add_lesion_contrast(image, tissues, lesion_kind, parts, sequence, srng, voxel_size)
        image = np.where(tissues.brain, image, 0.0).astype(np.float32)
        if space == "template":
            scans[sequence] = Scan(acquire(image, tissues.brain, srng, smooth_field), atlas.affine.copy())
            continue
        motion, angle, shift = (np.eye(4), 0.0, 0.0) if sequence == reference else _motion(srng, head_centre)
        to_scanner = motion @ pose @ atlas.affine
        brain_pts = native._world_points(tissues.brain, to_scanner)
        lesion_pts = native._world_points(lesion, to_scanner, step=1) if lesion.any() else np.zeros((0, 3))
        affine, shape, info = native._native_grid(srng, brain_pts, lesion_pts, NATIVE_PROTOCOLS[sequence])
        m = np.linalg.inv(to_scanner) @ affine  # native voxel -> template voxel
        nat_brain = _resample(tissues.brain, m, shape) > 0.5
        nat, effects = native.scanner_effects(_resample(image, m, shape), nat_brain, affine, srng)
        info.update(effects, motion_deg=round(angle, 2), motion_mm=round(shift, 2))
        scans[sequence] = Scan(nat, affine, info)
        if sequence == reference:
            mask = (_resample(lesion, m, shape) > 0.5) & nat_brain
    return MultiSequenceSubject(scans, mask, reference, tissues, parts)


def make_multiseq_dataset(
    out: str | Path,
    size: str = "small",
    seed: int = 0,
    lesion_kinds: tuple[str, ...] = LESION_KINDS,
    voxel_size: float = 2.0,
    n_train: int | None = None,
    n_test_normal: int | None = None,
    n_test_anomalous: int | None = None,
    space: str = "template",
    sequences: tuple[str, ...] = SEQUENCES,
    test_split: str = "test",
) -> Path:
    """Write the multi-sequence demo set (layout in the module docstring) and return ``out``.

    ``test_split`` names the test subjects' folder, mask folder and ``split`` value (the benchmark
    data writes its tuning set as ``tune``).
    """
    sequences = check_sequences(sequences)
    if space not in SPACES:
        raise ConfigError("space: " + did_you_mean(space, SPACES, "space"))
    plan = subject_plan(size, lesion_kinds, n_train, n_test_normal, n_test_anomalous)
    out = Path(out)
    atlas = mni_atlas(voxel_size)
    stream = 2 if space == "template" else 3  # shares no draws with the single-sequence sets
    rows: list[dict[str, Any]] = []
    members: dict[str, list[str]] = {}
    test_index = 100
    for i, (split, kind) in enumerate(progress(plan, desc="multi-sequence demo subjects", total=len(plan))):
        split = test_split if split == "test" else split
        subject = make_multiseq_subject(atlas, (seed, i, stream), kind, sequences, voxel_size, space)
        label = f"{i:03d}" if split == "train" else f"{test_index:03d}"
        if split != "train":
            test_index += 1
            ref = subject.scans[subject.reference]
            save_nifti(
                subject.mask.astype(np.uint8), ref.affine, out / f"{split}_masks" / f"sub-{label}.nii.gz"
            )
        row: dict[str, Any] = {
            "subject": f"sub-{label}",
            "split": split,
            "label": int(kind is not None),
            "lesion_kind": kind or "",
        }
        for sequence, scan in subject.scans.items():
            extra = {}
            if space == "native":
                spacing = np.sqrt((scan.affine[:3, :3] ** 2).sum(0))
                extra = {"SliceThickness": round(float(spacing.max()), 3)}
                for k in ("voxel_size", "stack", "axcodes", "motion_deg", "motion_mm"):
                    row[f"{sequence}_{k}"] = scan.info[k]
            bids.write_anat(out / split, label, sequence, scan.image, scan.affine, extra)
        members.setdefault(split, []).append(label)
        rows.append(row)
    for split, labels in members.items():
        bids.write_participants(out / split, labels)
        about = (
            "Normal subjects."
            if split == "train"
            else (
                f"Normal and lesioned subjects; ground truth in ../{split}_masks, labels in the manifest CSV beside this folder."
            )
        )
        bids.start_dataset(
            out / split,
            f"anomaly3d multi-sequence demo, {split} ({space} space)",
            f"Synthetic skull-stripped brain MRI ({', '.join(sequences)}) built from the MNI152 2009 "
            f"template by anomaly3d_core.demo.multiseq, seed {seed}. {about}",
        )
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["subject", "split", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return out
