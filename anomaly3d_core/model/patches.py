"""Patch extraction with coordinates, and the companion that rebuilds a volume from per-patch values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anomaly3d_core.model.grid import gaussian_kernel, patch_grid


@dataclass
class PatchSet:
    """Patches of one size: ``patches (N, *size)`` and their corner ``coords (N, 3)``."""

    patches: np.ndarray
    coords: np.ndarray
    size: tuple[int, int, int]
    stride: tuple[int, int, int]
    volume_shape: tuple[int, int, int]


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (int(v),) * 3 if isinstance(v, int | np.integer) else tuple(int(x) for x in v)  # type: ignore[return-value]


def extract_patches_3d(
    volume: np.ndarray,
    patch_sizes: Sequence[int | Sequence[int]] | int | Sequence[int] = (8, 8, 8),
    stride: int | Sequence[int] = 4,
    mask: np.ndarray | None = None,
    min_foreground: float = 0.0,
) -> list[PatchSet] | PatchSet:
    """Every patch on a strided grid (padding the far edges so the grid covers the volume).

    ``patch_sizes`` is one size or a list of sizes (multi-scale; a list of PatchSets comes back).
    With ``mask``, patches whose foreground fraction is below ``min_foreground`` are dropped.
    The strided view is built without a Python loop over patches.
    """
    multi = (
        isinstance(patch_sizes, Sequence)
        and len(patch_sizes) > 0
        and not isinstance(patch_sizes[0], int | np.integer)
    )
    sizes = [_triple(s) for s in patch_sizes] if multi else [_triple(patch_sizes)]  # type: ignore[arg-type]
    st = _triple(stride)
    out = []
    for size in sizes:
        bool_volume = volume.dtype == bool  # replicate padding needs numbers
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.uint8 if bool_volume else None))
        view, grid = patch_grid(x[None, None], size, st)
        coords = np.stack(
            np.meshgrid(*[np.arange(g) * s for g, s in zip(grid, st, strict=True)], indexing="ij"), -1
        ).reshape(-1, 3)
        patches = view.reshape(-1, *size).numpy()
        patches = patches.astype(bool) if bool_volume else patches
        if mask is not None and min_foreground > 0:
            m = torch.from_numpy(mask.astype(np.float32))[None, None]
            frac = patch_grid(m, size, st, mode="constant")[0][:, :, :, 0].mean(dim=(3, 4, 5))
            keep = frac.reshape(-1).numpy() >= min_foreground
            patches, coords = patches[keep], coords[keep]
        out.append(PatchSet(patches, coords, size, st, tuple(volume.shape)))  # type: ignore[arg-type]
    return out if multi else out[0]


def reconstruct_from_patches(
    values: np.ndarray,
    coords: np.ndarray,
    size: Sequence[int],
    volume_shape: Sequence[int],
    blend: str = "gaussian",
) -> np.ndarray:
    """Rebuild a volume from one value per patch (or a full patch of values) at ``coords``.

    Overlaps are averaged with Gaussian (or ``'mean'``: flat) weights; voxels no patch covers are 0.
    """
    size = _triple(size)
    shape = tuple(int(s) + p for s, p in zip(volume_shape, size, strict=True))
    weight = gaussian_kernel(size).numpy() if blend == "gaussian" else np.ones(size, np.float32)
    vals = np.asarray(values, dtype=np.float64).reshape(len(coords), -1)
    if vals.shape[1] == 1:
        vals = np.broadcast_to(vals, (len(coords), int(np.prod(size))))
    offsets = np.stack(np.meshgrid(*[np.arange(p) for p in size], indexing="ij"), -1).reshape(-1, 3)
    voxels = np.asarray(coords)[:, None, :] + offsets[None]  # (N, p^3, 3), all at once
    flat = np.ravel_multi_index(tuple(voxels.reshape(-1, 3).T), shape)
    w = np.broadcast_to(weight.reshape(1, -1), vals.shape)
    num = np.bincount(flat, weights=(vals * w).ravel(), minlength=int(np.prod(shape))).reshape(shape)
    den = np.bincount(flat, weights=w.ravel(), minlength=int(np.prod(shape))).reshape(shape)
    out = np.where(den > 0, num / np.maximum(den, 1e-12), 0.0)
    return out[: volume_shape[0], : volume_shape[1], : volume_shape[2]].astype(np.float32)


__all__ = ["PatchSet", "extract_patches_3d", "reconstruct_from_patches"]
