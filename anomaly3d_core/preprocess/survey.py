"""What kind of scans a data set holds, read from headers: one template grid, or scans in their own space.

``anomaly3d fit`` and ``demo`` print :meth:`GridSurvey.advice` so a user learns which preset
suits the data before training; ``register_to: auto`` uses :func:`in_template_space` per scan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from anomaly3d_core.errors import DataError
from anomaly3d_core.io.files import load_volume
from anomaly3d_core.io.volume import Volume

#: How far (mm) a scan's field of view may lie from the template's and still count as template space.
TEMPLATE_TOLERANCE_MM = 6.0

#: The preset per kind of data: the candidate with the best cross-fitted validation AP on the
#: project's benchmarks (``experiments/recommend.py``, README *Which preset*), and its test figures.
RECOMMENDED: dict[str, tuple[str, str]] = {
    "template, one sequence": (
        "brain_mri_synthetic.yaml",
        "benchmark voxel AP 0.54; brain_mri.yaml scores 0.63 there and fits in seconds, "
        "but ranks third on the validation",
    ),
    "native, one sequence": (
        "brain_mri_synthetic.yaml",
        "benchmark voxel AP 0.48, sample AUROC 0.81; brain_mri_native.yaml 0.46, 0.72",
    ),
    "template, T1w + FLAIR": (
        "brain_mri_synthetic_multiseq.yaml",
        "benchmark voxel AP 0.87, sample AUROC 0.94; brain_mri_multiseq.yaml 0.89, 0.95",
    ),
    "native, T1w + FLAIR": (
        "brain_mri_synthetic_multiseq.yaml",
        "benchmark voxel AP 0.83, sample AUROC 1.00; brain_mri_multiseq.yaml 0.84, 0.75",
    ),
}


def _world_box(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Lower and upper world corners (RAS mm) of a grid's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return np.stack([world.min(1), world.max(1)])


def in_template_space(shape: Sequence[int], affine: np.ndarray, template: Volume) -> bool:
    """True when the grid is axis-aligned and covers the template's field of view (within a few mm).

    Such a scan is already in the template's space (the demo data, or scans registered before),
    so it needs no registration.
    """
    affine = np.asarray(affine, dtype=np.float64)
    axes = np.abs(affine[:3, :3]) / np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(np.sort(axes, axis=0)[-1], 1.0, atol=1e-3):  # oblique: rotated against RAS
        return False
    box, ref_box = _world_box(shape, affine), _world_box(template.shape, template.affine)
    return bool(np.abs(box - ref_box).max() <= TEMPLATE_TOLERANCE_MM)


@dataclass
class GridSurvey:
    """Grids of a set of scans: shapes, voxel sizes, axis orders and whether they sit in template space."""

    grids: Counter = field(default_factory=Counter)  # (shape, rounded affine) -> count
    spacings: Counter = field(default_factory=Counter)  # rounded voxel size -> count
    orientations: Counter = field(default_factory=Counter)  # axis codes, e.g. ('L', 'P', 'S')
    n_template: int = 0
    unreadable: list[str] = field(default_factory=list)

    @property
    def n_scans(self) -> int:
        return sum(self.grids.values())

    @property
    def shared_grid(self) -> bool:
        return len(self.grids) == 1

    @property
    def template_space(self) -> bool:
        return self.n_scans > 0 and self.n_template == self.n_scans and self.shared_grid

    def describe(self) -> str:
        sizes = sorted(self.spacings)
        spacing = (
            "voxel size " + "x".join(f"{s:g}" for s in sizes[0]) + " mm"
            if len(sizes) == 1
            else f"{len(sizes)} voxel sizes ({min(min(s) for s in sizes):g}-{max(max(s) for s in sizes):g} mm)"
        )
        axes = ", ".join("".join(o) for o in sorted(self.orientations))
        return f"{self.n_scans} scan(s) on {len(self.grids)} grid(s), {spacing}, axis order {axes}"

    def advice(self, normative: bool, register_to: str, sequences: Sequence[str] = ()) -> str:
        """One paragraph: what the data is, what this config does with it, and the recommended preset
        for such data (README, *Which preset*)."""
        if self.n_scans == 0:
            return "no readable scans to survey"
        return f"{self._config_advice(normative, register_to)} {self.recommendation(sequences)}"

    def recommendation(self, sequences: Sequence[str] = ()) -> str:
        """The preset the benchmarks' validation picks for this kind of data: space and sequences."""
        kind = f"{'template' if self.template_space else 'native'}, " + (
            "T1w + FLAIR" if "FLAIR" in sequences else "one sequence"
        )
        preset, figures = RECOMMENDED[kind]
        return f"Recommended for {kind}: experiments/configs/{preset} ({figures})."

    def _config_advice(self, normative: bool, register_to: str) -> str:
        what = self.describe()
        if self.template_space:
            return (
                f"{what}: all in MNI152 template space. experiments/configs/brain_mri.yaml "
                "(normative scoring) suits them as they are."
            )
        if normative and register_to == "none":
            return (
                f"{what}: not all on one template grid. Normative scoring compares voxels at the same "
                "place, so set data.preprocessing.register_to: auto (or mni152), or use "
                "experiments/configs/brain_mri_native.yaml, which scores scans in their own space."
            )
        if register_to != "none":
            return (
                f"{what}: scans in their own space; this config registers each one that is not already in "
                "MNI152 space to the template (data.preprocessing.register_to). Without registration, "
                "experiments/configs/brain_mri_native.yaml scores them in their own space, faster."
            )
        return (
            f"{what}: scans in their own space, scored without registration. For scans of one template "
            "grid (or with register_to: auto), experiments/configs/brain_mri.yaml adds normative scoring."
        )


def survey(paths: Sequence[str | Path], template: Volume) -> GridSurvey:
    """Survey scans from their headers (NIfTI) or, for other formats, by reading them."""
    out = GridSurvey()
    for path in paths:
        try:
            if str(path).lower().endswith((".nii", ".nii.gz")):
                img = nib.load(str(path))
                shape, affine = tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
            else:
                volume = load_volume(path)
                shape, affine = volume.shape, volume.affine
        except (DataError, OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            out.unreadable.append(f"{path}: {exc}")
            continue
        spacing = tuple(float(round(s, 2)) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        out.grids[(shape, tuple(np.round(affine, 2).ravel()))] += 1
        out.spacings[tuple(sorted(spacing))] += 1
        out.orientations[ornt.aff2axcodes(affine)] += 1
        out.n_template += in_template_space(shape, affine, template)
    return out
