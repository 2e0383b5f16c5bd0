"""The :class:`Volume`: voxel data plus the geometry it came with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D scan with its world geometry.

    ``array`` is indexed (i, j, k) as in NIfTI; ``affine`` maps voxel indices to RAS+ millimetres.
    A subject with several sequences is one volume whose array has the sequences as a last axis
    (i, j, k, c), as a 4D NIfTI does, all on the reference sequence's grid; ``meta["sequences"]``
    names them (as read, before the ``coregister`` preprocessing step, each sequence is still on
    its own grid: a :class:`~anomaly3d_core.preprocess.sequences.SubjectScans`). ``path`` is where
    it was read from (``None`` for in-memory data; for a subject, its reference sequence's file);
    ``meta`` carries loader extras such as the DICOM series UID.
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
        """The spatial grid (a subject's sequences are a further axis, see :attr:`channels`)."""
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Sequences per voxel: 1 for a plain 3D scan."""
        return int(self.array.shape[3]) if self.array.ndim == 4 else 1

    def channel(self, index: int = 0) -> np.ndarray:
        """One sequence's 3D array (index 0 is the reference sequence)."""
        return self.array[..., index] if self.array.ndim == 4 else self.array

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @classmethod
    def from_array(
        cls, array: np.ndarray, affine: np.ndarray | None = None, path: str | None = None
    ) -> Volume:
        return cls(np.asarray(array), np.eye(4) if affine is None else affine, path)
