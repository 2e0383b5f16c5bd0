"""The one patch grid: every patch position on a strided grid as a view, and the Gaussian window
that blends overlapping patches. The scoring network (:class:`~anomaly3d_core.model.network.AnomalyNet`,
on feature maps) and :func:`~anomaly3d_core.model.patches.extract_patches_3d` (on volumes) both use it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gaussian_kernel(size: tuple[int, int, int], sigma_scale: float = 0.25) -> torch.Tensor:
    """Separable Gaussian window, ``sigma = size * sigma_scale``, peak 1."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / max(n * sigma_scale, 1e-3)) ** 2))
    k = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return k / k.max()


def grid_padding(
    shape: Sequence[int], patch: Sequence[int], stride: Sequence[int], context: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """Voxels to add before and after each axis so that the grid of ``patch``-sized windows every
    ``stride`` covers ``shape``; a larger ``context`` window is centred on each patch."""
    big = list(context or patch)
    front = [(b - p) // 2 for b, p in zip(big, patch, strict=True)]
    back = []
    for n, p, s, b, f in zip(shape, patch, stride, big, front, strict=True):
        covered = max(int(n), p)
        back.append((-(covered - p)) % s + (covered - int(n)) + b - p - f)
    return front, back


def patch_grid(
    x: torch.Tensor,
    patch: Sequence[int],
    stride: Sequence[int],
    context: Sequence[int] | None = None,
    mode: str = "replicate",
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """All windows of ``x`` ``(1, C, X, Y, Z)`` on the strided grid, as a view ``(n0, n1, n2, C, *window)``
    (the window is ``context`` when given, else ``patch``) and the grid ``(n0, n1, n2)``. The edges are
    padded by ``mode`` (``replicate``, or ``constant``: zeros) so that the grid covers every voxel."""
    big, s = tuple(context or patch), tuple(stride)
    front, back = grid_padding(x.shape[2:], patch, stride, context)
    if any(front) or any(back):
        x = F.pad(x, (front[2], back[2], front[1], back[1], front[0], back[0]), mode=mode)
    view = x[0].unfold(1, big[0], s[0]).unfold(2, big[1], s[1]).unfold(3, big[2], s[2])
    return view.permute(1, 2, 3, 0, 4, 5, 6), tuple(view.shape[1:4])  # type: ignore[return-value]
