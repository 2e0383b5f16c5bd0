"""The benchmarks' validation column: cross-fitted synthetic-lesion AP over the training normals.

Every benchmark row (a route) gets a *validation AP* next to its test AP:
:func:`anomaly3d_core.evaluation.validation.crossfit_validation` splits the 16 training normals
into 2 folds, fits the route on one fold, scores the other fold's normals as they are and with
synthetic lesions unlike the test's (``anomaly3d_core.evaluation.synthetic``: small, faint,
diffuse and textured changes relative to the tissue, in world coordinates on each sequence's own
grid), and pools the voxel AP. No test or tuning scan is used. :func:`spearman_lines` says how
well that figure ranks the routes compared with the test figure (and compares the old tuning set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FOLDS = 2


def read_volumes(item: Any, channels: Sequence[str]) -> dict[str, Any]:
    """``{sequence: Volume}`` of a file (one unnamed sequence, key ``image``) or a subject's files."""
    import nibabel as nib

    from anomaly3d_core.io.volume import Volume

    def load(path: Any) -> Volume:
        img = nib.load(str(path))
        return Volume(np.asarray(img.get_fdata(dtype=np.float32)), img.affine, str(path))

    if isinstance(item, str | Path):
        return {"image": load(item)}
    return {seq: load(item.files[seq]) for seq in channels}


def as_input(volumes: dict[str, Any]) -> Any:
    """What a detector scores: the one volume of a file, or the ``{sequence: Volume}`` mapping of a subject."""
    return volumes["image"] if list(volumes) == ["image"] else volumes


def validate(
    fit: Callable[[list[Any]], Any],
    score: Callable[[Any, Any], tuple[np.ndarray, float]],
    train: Sequence[Any],
    channels: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, float]:
    """Cross-fitted validation figures of one route: ``fit(items) -> model``, ``score(model, input) -> (map, volume score)``."""
    from anomaly3d_core.evaluation.validation import crossfit_validation

    return crossfit_validation(
        list(train),
        fit,
        lambda item: read_volumes(item, channels),
        lambda model, volumes: score(model, as_input(volumes)),
        k=FOLDS,
        seed=seed,
    ).figures()


def spearman_lines(results: Sequence[dict[str, Any]], test_key: Callable[[dict], float]) -> list[str]:
    """How well the validation AP, and the old tuning-set AP, rank the rows as the test AP does:
    over every row, and over the detector routes alone (rows not named ``baseline: ...``)."""
    from anomaly3d_core.evaluation.validation import spearman

    lines = []
    groups = {
        "all rows": lambda r: True,
        "detector routes": lambda r: not str(r["name"]).startswith("baseline"),
    }
    for label, key in (
        ("cross-fitted synthetic validation AP", lambda r: r.get("validation", {}).get("pixel_ap")),
        ("tuning-set AP (2 normals, tumour and infarct)", lambda r: r.get("tune", {}).get("pixel_ap")),
    ):
        for group, keep in groups.items():
            pairs = [(key(r), test_key(r)) for r in results if keep(r) and key(r) is not None]
            if len(pairs) >= 3:
                rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
                lines.append(
                    f"Spearman rank correlation, {label} vs test AP, {group} ({len(pairs)}): {rho:.2f}"
                )
    return lines


def size_cells(row: dict[str, Any]) -> str:
    """``a / b / c`` lesion sensitivity for < 0.5, 0.5-5 and > 5 cm³ (with counts in the JSON)."""
    sizes = row.get("size_sensitivity")
    if not sizes:
        return "— | — | —"
    return " | ".join(f"{v['sensitivity']:.2f}" for v in sizes.values())
