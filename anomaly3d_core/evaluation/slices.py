"""Which slices to show and how to name them: arrays reoriented to RAS, targets through what matters.

A volume's array axes may lie in any order (LAS, PSR, ...). :func:`to_ras` reorients arrays to the
closest canonical RAS order (as nibabel's ``as_closest_canonical`` does), so that axis 0 runs
left→right, axis 1 posterior→anterior and axis 2 inferior→superior; only then are planes named:
a sagittal slice fixes axis 0, a coronal one axis 1, an axial one axis 2. :func:`plane_image`
returns a slice ready to draw in the radiological convention (the patient's right on the
viewer's left in coronal and axial views; anterior on the right in sagittal ones).

:func:`targets` picks the places worth showing: each flagged cluster (through its highest score),
each ground-truth lesion (through the lesion voxel nearest its centre), else the highest score.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

PLANES = ("sagittal", "coronal", "axial")  # the RAS axis each one fixes: 0, 1, 2
# Screen orientation letters (left, right, bottom, top) of each plane in the radiological convention.
PLANE_LETTERS = {
    "sagittal": ("P", "A", "I", "S"),
    "coronal": ("R", "L", "I", "S"),
    "axial": ("R", "L", "P", "A"),
}


@dataclass(frozen=True)
class RasGrid:
    """How a volume's array maps onto RAS order: the nibabel orientation and the voxel sizes after it."""

    ornt: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> RasGrid:
        ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
        sizes = nib.affines.voxel_sizes(np.asarray(affine, dtype=float))
        order = ornt[:, 0].astype(int)  # input axis i goes to RAS axis order[i]
        spacing = [0.0, 0.0, 0.0]
        ras_shape = [0, 0, 0]
        for i in range(3):
            spacing[order[i]] = float(sizes[i])
            ras_shape[order[i]] = int(shape[i])
        return cls(ornt, tuple(spacing), tuple(ras_shape))  # type: ignore[arg-type]

    def array(self, data: np.ndarray) -> np.ndarray:
        """``data`` (3D, on the volume's grid) in RAS order."""
        return np.asarray(nib.orientations.apply_orientation(np.asarray(data), self.ornt))

    def index(self, ijk: tuple[int, ...]) -> tuple[int, int, int]:
        """A voxel index of the volume's grid as an index of the RAS array."""
        out = [0, 0, 0]
        for i in range(3):
            axis, flip = int(self.ornt[i, 0]), self.ornt[i, 1] < 0
            out[axis] = self.shape[axis] - 1 - int(ijk[i]) if flip else int(ijk[i])
        return tuple(out)  # type: ignore[return-value]


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, RasGrid]:
    """``data`` reoriented to RAS order and the grid that did it (apply it to maps of the same scan)."""
    grid = RasGrid.from_affine(affine, data.shape)
    return grid.array(data), grid


def plane_image(
    ras: np.ndarray, plane: str, index: int, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, float]:
    """The slice of the RAS array ``ras`` at ``index`` on ``plane``, as rows (bottom→top) × columns
    (left→right of the screen) in the radiological convention, and its pixel aspect (height/width)."""
    axis = PLANES.index(plane)
    cut = np.take(ras, int(np.clip(index, 0, ras.shape[axis] - 1)), axis=axis)
    if plane == "sagittal":  # columns: posterior→anterior (axis 1); rows: inferior→superior (axis 2)
        image, aspect = cut.T, spacing[2] / spacing[1]
    elif plane == "coronal":  # columns: right→left (axis 0 flipped); rows: axis 2
        image, aspect = cut[::-1].T, spacing[2] / spacing[0]
    else:  # axial: columns right→left; rows: posterior→anterior (axis 1)
        image, aspect = cut[::-1].T, spacing[1] / spacing[0]
    return image, float(aspect)


@dataclass(frozen=True)
class Target:
    """A place to show: its voxel on the scan's own grid, what it is and how big."""

    label: str
    kind: str  # "cluster", "lesion" or "peak"
    voxel: tuple[int, int, int]
    n_voxels: int
    peak: float


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(np.asarray(mask) > 0, np.ones((3, 3, 3), bool))


def cluster_targets(scores: np.ndarray, mask: np.ndarray, limit: int = 3) -> list[Target]:
    """Each flagged cluster (26-connected), largest first, through its highest-scoring voxel."""
    labels, n = _components(mask)
    if not n:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    out = []
    for rank, lab in enumerate(np.argsort(-sizes, kind="stable")[:limit] + 1, start=1):
        where = np.flatnonzero(labels.ravel() == lab)
        best = where[int(np.argmax(np.asarray(scores).ravel()[where]))]
        voxel = tuple(int(v) for v in np.unravel_index(best, labels.shape))
        out.append(
            Target(
                f"flagged cluster {rank} of {n}",
                "cluster",
                voxel,  # type: ignore[arg-type]
                int(sizes[lab - 1]),
                float(np.asarray(scores)[voxel]),
            )
        )
    return out


def lesion_targets(scores: np.ndarray, truth: np.ndarray, limit: int = 3) -> list[Target]:
    """Each ground-truth lesion, largest first, through its voxel nearest the lesion's centre."""
    labels, n = _components(truth)
    if not n:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    out = []
    for rank, lab in enumerate(np.argsort(-sizes, kind="stable")[:limit] + 1, start=1):
        coords = np.argwhere(labels == lab)
        centre = coords.mean(axis=0)
        voxel = tuple(int(v) for v in coords[int(np.argmin(((coords - centre) ** 2).sum(axis=1)))])
        peak = float(np.asarray(scores)[labels == lab].max())
        out.append(
            Target(f"true lesion {rank} of {n}", "lesion", voxel, int(sizes[lab - 1]), peak)  # type: ignore[arg-type]
        )
    return out


def peak_target(scores: np.ndarray) -> Target:
    voxel = tuple(int(v) for v in np.unravel_index(int(np.argmax(scores)), np.asarray(scores).shape))
    return Target("highest score (nothing flagged)", "peak", voxel, 1, float(np.asarray(scores)[voxel]))  # type: ignore[arg-type]


def targets(
    scores: np.ndarray, mask: np.ndarray | None = None, truth: np.ndarray | None = None, limit: int = 3
) -> list[Target]:
    """The lesions of ``truth`` and the clusters of ``mask`` (up to ``limit`` each), else the peak."""
    found = []
    if truth is not None:
        found += lesion_targets(scores, truth, limit)
    if mask is not None:
        found += cluster_targets(scores, mask, limit)
    return found or [peak_target(scores)]
