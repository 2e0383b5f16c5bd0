"""A realistic synthetic brain-MRI data set built from the MNI152 2009 template that nilearn ships.

Normal subjects differ anatomically (smooth deformation, affine jitter), in tissue contrast
(grey/white-matter intensity), bias field and Rician noise. Test subjects carry synthetic
lesions of several kinds, with ground-truth masks. Output is deterministic for a seed.

Layout written by :func:`make_demo_dataset`::

    OUT/train/sub-000.nii.gz ...        normal subjects for fitting
    OUT/test/sub-100.nii.gz ...         normal and lesioned test subjects
    OUT/test_masks/sub-100.nii.gz ...   ground truth (all zero for normal subjects)
    OUT/manifest.csv                    file, split, label, lesion_kind

With several sequences (``sequences=("T1w", "FLAIR")``) or ``layout="bids"``, ``train/`` and
``test/`` are BIDS raw datasets instead (see :mod:`.multiseq`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from anomaly3d_core.demo.anatomy import (
    LESION_KINDS,
    SIZES,
    Atlas,
    add_lesion,
    make_subject,
    mni_atlas,
    subject_plan,
)
from anomaly3d_core.demo.contrasts import check_sequences
from anomaly3d_core.demo.multiseq import make_multiseq_dataset
from anomaly3d_core.demo.native import make_native_dataset
from anomaly3d_core.errors import ConfigError, did_you_mean
from anomaly3d_core.io.files import save_nifti
from anomaly3d_core.progress import progress

__all__ = ["LESION_KINDS", "SIZES", "Atlas", "add_lesion", "make_demo_dataset", "make_subject", "mni_atlas"]


def make_demo_dataset(
    out: str | Path,
    size: str = "small",
    seed: int = 0,
    lesion_kinds: tuple[str, ...] = LESION_KINDS,
    voxel_size: float = 2.0,
    n_train: int | None = None,
    n_test_normal: int | None = None,
    n_test_anomalous: int | None = None,
    space: str = "template",
    sequences: tuple[str, ...] = ("T1w",),
    layout: str | None = None,
) -> Path:
    """Write the demo set (see module docstring) and return ``out``.

    ``space="native"`` writes scans as a multi-site study acquires them instead (head pose, voxel
    size, axis order, field of view and intensity units vary; see :mod:`.native`); there
    ``voxel_size`` is the template grid the subjects are built on before resampling.

    ``sequences`` (any of T1w, T2w, FLAIR) and ``layout`` (``"flat"``: one file per subject, only for
    T1w alone; ``"bids"``; default: ``"bids"`` for several sequences) choose the multi-sequence
    generator (:mod:`.multiseq`); T1w alone in the flat layout is the single-sequence set.
    """
    sequences = check_sequences(tuple(sequences))
    layout = layout or ("flat" if sequences == ("T1w",) else "bids")
    if layout not in ("flat", "bids"):
        raise ConfigError("layout: " + did_you_mean(layout, ("flat", "bids"), "layout"))
    if layout == "bids":
        return make_multiseq_dataset(
            out,
            size,
            seed,
            lesion_kinds,
            voxel_size,
            n_train,
            n_test_normal,
            n_test_anomalous,
            space,
            sequences,
        )
    if sequences != ("T1w",):
        raise ConfigError(f"layout 'flat' holds T1w alone, not {list(sequences)}; use layout='bids'")
    if space == "native":
        return make_native_dataset(
            out, size, seed, lesion_kinds, voxel_size, n_train, n_test_normal, n_test_anomalous
        )
    if space != "template":
        raise ConfigError("space: " + did_you_mean(space, ("template", "native"), "space"))
    plan = subject_plan(size, lesion_kinds, n_train, n_test_normal, n_test_anomalous)
    out = Path(out)
    atlas = mni_atlas(voxel_size)
    rows = []
    test_index = 100
    for i, (split, kind) in enumerate(progress(plan, desc="demo subjects", total=len(plan))):
        rng = np.random.default_rng([seed, i])
        image, mask = make_subject(atlas, rng, kind, voxel_size)
        if split == "train":
            name = f"sub-{i:03d}.nii.gz"
        else:
            name = f"sub-{test_index:03d}.nii.gz"
            test_index += 1
            save_nifti(mask.astype(np.uint8), atlas.affine, out / "test_masks" / name)
        save_nifti(image, atlas.affine, out / split / name)
        rows.append(
            {
                "file": f"{split}/{name}",
                "split": split,
                "label": int(kind is not None),
                "lesion_kind": kind or "",
            }
        )
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "split", "label", "lesion_kind"])
        writer.writeheader()
        writer.writerows(rows)
    return out
