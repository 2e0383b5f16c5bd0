"""Per-subject and per-lesion facts of an evaluation, for the group report's tables."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.evaluation.metrics import dice_iou, lesion_detection
from anomaly3d_core.reports.subject import lesion_table


def lesion_kinds(masks_dir: Path, registry: Any = None) -> dict[str, str]:
    """Output stem -> lesion kind, from a ``manifest.csv`` beside ``masks_dir`` with a ``lesion_kind``
    column (keyed by ``subject`` or by ``file``); empty when there is none."""
    from anomaly3d_core.io.files import scan_stem

    path = Path(masks_dir).parent / "manifest.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "lesion_kind" not in (reader.fieldnames or []):
            return {}
        out = {}
        for row in reader:
            key = row.get("subject") or (scan_stem(row["file"], registry) if row.get("file") else "")
            if key:
                out[key] = row["lesion_kind"] or "normal"
        return out


def subject_evaluation(
    result: Any, truth: np.ndarray, name: str, kind: str = ""
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One scan's row of the per-subject table and its lesions (size, detected) for the size table."""
    mask = np.asarray(result.mask, bool)
    found = lesion_detection(truth, mask)
    has_lesion = bool(truth.any())
    subject = {
        "name": name,
        "kind": kind or ("lesion" if has_lesion else "normal"),
        "has_lesion": has_lesion,
        "volume_score": float(result.volume_score),
        "is_anomalous": bool(result.is_anomalous),
        "dice": dice_iou(truth, mask)[0] if has_lesion else None,
        "n_lesions": found["tp"] + found["fn"],
        "n_detected": found["tp"],
        "false_clusters": found["fp"],
    }
    lesions = [
        {"name": name, "kind": subject["kind"], **row}
        for row in lesion_table(result.score_map, mask, truth, result.volume.affine, result.threshold)
    ]
    return subject, lesions


def write_tables(out_dir: Path, subjects: list[dict[str, Any]], lesions: list[dict[str, Any]]) -> None:
    """``subjects.tsv`` (one row per scan) and ``lesions.tsv`` (one row per true lesion) of an evaluation."""
    from anomaly3d_core.io.files import atomic_write

    for name, rows in (("subjects.tsv", subjects), ("lesions.tsv", lesions)):
        if not rows:
            continue
        columns = list(rows[0])

        def write(tmp: str, rows: list[dict[str, Any]] = rows, columns: list[str] = columns) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns, delimiter="\t", lineterminator="\n", restval="n/a")
                writer.writeheader()
                writer.writerows({k: "n/a" if v is None else v for k, v in r.items()} for r in rows)

        atomic_write(Path(out_dir) / name, write)
