"""The :class:`Volume`: voxel data plus the geometry it came with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D scan with its world geometry.

    ``array`` is indexed (i, j, k) as in NIfTI; ``affine`` maps voxel indices to RAS+ millimetres.
    ``path`` is where it was read from (``None`` for in-memory data); ``meta`` carries loader extras
    such as the DICOM series UID.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @classmethod
    def from_array(
        cls, array: np.ndarray, affine: np.ndarray | None = None, path: str | None = None
    ) -> Volume:
        return cls(np.asarray(array), np.eye(4) if affine is None else affine, path)
