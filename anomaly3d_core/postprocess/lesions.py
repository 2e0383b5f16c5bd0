"""The lesion table of one scan: each flagged cluster's size, peak and position, written as TSV.

Clusters are found where the decision was made (the working grid); each is mapped back onto the
scan's own grid (nearest neighbour), where its volume, peak and centre are measured, in scanner
(world, RAS mm) coordinates through the scan's affine. On a registered route the working grid is
the template's, so the same cluster's centre and peak are also given in MNI coordinates.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.io.files import atomic_write

LESION_COLUMNS = (
    "cluster",
    "volume_mm3",
    "peak_score",
    "peak_p",
    "cluster_p",
    "centre_x",
    "centre_y",
    "centre_z",
    "peak_x",
    "peak_y",
    "peak_z",
    "centre_mni_x",
    "centre_mni_y",
    "centre_mni_z",
    "peak_mni_x",
    "peak_mni_y",
    "peak_mni_z",
)


def world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel indices (``(..., 3)``) to world coordinates (mm) through a 4x4 affine."""
    affine = np.asarray(affine, np.float64)
    return np.asarray(ijk, np.float64) @ affine[:3, :3].T + affine[:3, 3]


def _centre_and_peak(
    where: np.ndarray, scores: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    idx = np.argwhere(where)
    peak = tuple(int(v) for v in idx[int(np.argmax(scores[where]))])
    return world(affine, idx.mean(0)), world(affine, np.array(peak)), peak


def lesion_table(
    labels_native: np.ndarray,
    score_map: np.ndarray,
    p_map: np.ndarray | None,
    affine: np.ndarray,
    cluster_p: np.ndarray | None = None,
    labels_working: np.ndarray | None = None,
    working_scores: np.ndarray | None = None,
    mni_affine: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per cluster label (1..n) of ``labels_native`` (on the scan's grid with ``affine``).

    ``mni_affine`` (the template grid's affine on a registered route) with ``labels_working`` and
    ``working_scores`` adds the MNI columns; a cluster lost when mapped back keeps NaN native columns.
    """
    n = int(max(labels_native.max(initial=0), 0 if labels_working is None else labels_working.max(initial=0)))
    voxel_mm3 = float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3])))
    rows = []
    for label in range(1, n + 1):
        where = labels_native == label
        row: dict[str, Any] = dict.fromkeys(LESION_COLUMNS, math.nan)
        row["cluster"] = label
        row["cluster_p"] = float(cluster_p[label - 1]) if cluster_p is not None else math.nan
        if where.any():
            centre, peak, at = _centre_and_peak(where, score_map, affine)
            row["volume_mm3"] = float(where.sum()) * voxel_mm3
            row["peak_score"] = float(score_map[at])
            row["peak_p"] = float(p_map[at]) if p_map is not None else math.nan
            row |= {f"centre_{a}": float(v) for a, v in zip("xyz", centre, strict=True)}
            row |= {f"peak_{a}": float(v) for a, v in zip("xyz", peak, strict=True)}
        if mni_affine is not None and labels_working is not None and working_scores is not None:
            there = labels_working == label
            if there.any():
                centre, peak, _ = _centre_and_peak(there, working_scores, mni_affine)
                row |= {f"centre_mni_{a}": float(v) for a, v in zip("xyz", centre, strict=True)}
                row |= {f"peak_mni_{a}": float(v) for a, v in zip("xyz", peak, strict=True)}
        rows.append(row)
    return rows


def lesion_tsv(rows: list[dict[str, Any]]) -> str:
    """The table as TSV text (``n/a`` for values that do not apply, as BIDS writes them)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LESION_COLUMNS), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(k, v) for k, v in row.items()})
    return buf.getvalue()


def _cell(key: str, value: Any) -> Any:
    """p-values with 4 significant digits (a tiny one never prints as 0), other numbers to 6 decimals."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.4g}" if key.endswith("_p") else round(value, 6)
    return value


def write_lesion_table(rows: list[dict[str, Any]], path: Path) -> None:
    """:func:`lesion_tsv` written atomically to ``path``."""
    text = lesion_tsv(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
