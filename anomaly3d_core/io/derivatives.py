"""Results of a BIDS input written as a BIDS-Derivatives dataset.

Layout of ``OUT`` (the derivatives dataset's root, e.g. ``bids/derivatives/anomaly3d``)::

    dataset_description.json           DatasetType "derivative", GeneratedBy anomaly3d and the model,
                                       SourceDatasets / DatasetLinks as relative and bids: URIs
    scores.tsv + scores.json           one row per subject (and session), its columns described
    scores.csv                         the same rows, as for any input (the batch's own record)
    report.html, sub-01[_ses-1].html   group and subject reports
    sub-01/[ses-1/]anat/
      sub-01[_ses-1]_space-<ref>_desc-anomaly_statmap.nii.gz + .json   voxel scores; sidecar: volume score and
                                                                       threshold, p-value, alpha, decision, mask rule,
                                                                       model, sources
      sub-01[_ses-1]_space-<ref>_desc-pvalue_statmap.nii.gz + .json    voxel p-values against the calibration normals
      sub-01[_ses-1]_space-<ref>_desc-anomaly_mask.nii.gz + .json      voxels flagged anomalous
      sub-01[_ses-1]_space-<ref>_desc-anomaly_lesions.tsv              one row per flagged cluster

``space-<ref>`` is the reference sequence (``space-T1w``: on the subject's own T1w grid, as
fMRIPrep names it). ``desc-anomaly`` with the ``statmap`` suffix (BIDS statistical-model
derivatives, BEP041) replaces the earlier ``stat-`` entity, which BIDS does not define. Paths in
JSON files are relative to ``OUT`` or ``bids:raw:`` URIs into the source dataset, so the folder
can move with its data.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anomaly3d_core.io.files import atomic_write
from anomaly3d_core.io.subjects import Subject

BIDS_VERSION = "1.9.0"
SCORES_TSV = "scores.tsv"
# The columns of scores.tsv as its JSON sidecar describes them (BIDS tabular-file convention).
COLUMN_DESCRIPTIONS: dict[str, dict[str, Any]] = {
    "participant_id": {"Description": "BIDS subject label (sub-<label>)"},
    "session_id": {"Description": "BIDS session label (ses-<label>); n/a without sessions"},
    "volume_score": {"Description": "scan-level anomaly score, the statistic named in scan_statistic"},
    "volume_threshold": {
        "Description": "the scan-score threshold at alpha: volume_score above it <=> p_value <= alpha"
    },
    "p_value": {
        "Description": "conformal p-value of the scan score against the calibration normals; n/a without them"
    },
    "alpha": {"Description": "significance level of the decision (threshold.alpha)"},
    "is_anomalous": {
        "Description": "the model's decision, made by decision_rule",
        "Levels": {"True": "flagged anomalous", "False": "normal"},
    },
    "decision_rule": {
        "Description": "the rule that decided is_anomalous",
        "Levels": {
            "p_value <= alpha": "calibrated: a healthy scan is flagged with probability at most alpha",
            "volume_score > volume_threshold (uncalibrated)": "too few calibration normals for alpha (or a "
            "model without calibration nulls): no stated error rate",
        },
    },
    "scan_statistic": {"Description": "what volume_score is: largest_cluster_mass or top_k_mean"},
    "n_calibration": {"Description": "number of normal scans the p-values were calibrated on"},
    "mask_rule": {
        "Description": "how the mask was made: cluster (family-wise at alpha), fdr (Benjamini-Hochberg) or threshold"
    },
    "voxel_threshold": {
        "Description": "the calibrated voxel score threshold (the mask of mask_rule threshold)"
    },
    "n_lesions": {"Description": "number of flagged clusters (rows of lesion_table)"},
    "p_map": {"Description": "voxel p-value map, relative to this dataset's root"},
    "lesion_table": {"Description": "table of flagged clusters, relative to this dataset's root"},
    "score_map": {"Description": "voxel score map, relative to this dataset's root"},
    "mask": {"Description": "mask of flagged voxels, relative to this dataset's root"},
    "registration_dice": {
        "Description": "Dice of the registered scan's foreground with the template brain mask "
        "(below 0.8: poor registration); n/a when not registered"
    },
    "registration_metric": {
        "Description": "final Mattes mutual information of the registration (above -0.5: poor); "
        "n/a when not registered"
    },
}


def derivative_names(subject: Subject, reference: str) -> dict[str, str]:
    """Paths (relative to the derivatives root) of a subject's score map, p-map, mask, lesion table and sidecars."""
    folder = f"sub-{subject.subject}/" + (f"ses-{subject.session}/" if subject.session else "") + "anat/"
    base = f"{folder}{subject.stem}_space-{reference}"
    return {
        "score_map": f"{base}_desc-anomaly_statmap.nii.gz",
        "sidecar": f"{base}_desc-anomaly_statmap.json",
        "p_map": f"{base}_desc-pvalue_statmap.nii.gz",
        "p_map_sidecar": f"{base}_desc-pvalue_statmap.json",
        "mask": f"{base}_desc-anomaly_mask.nii.gz",
        "mask_sidecar": f"{base}_desc-anomaly_mask.json",
        "lesion_table": f"{base}_desc-anomaly_lesions.tsv",
    }


def bids_uri(path: str | Path, root: Path | None) -> str:
    """``bids:raw:sub-01/anat/...`` for a file of the source dataset, else the path as it is."""
    if root is not None:
        try:
            return "bids:raw:" + Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def model_reference(model_uri: str, out: Path) -> str:
    """A model as the derivatives name it: an MLflow URI as it is, a folder relative to ``out``."""
    if not model_uri or "://" in model_uri or model_uri.startswith(("models:/", "runs:/")):
        return model_uri
    return Path(os.path.relpath(Path(model_uri).resolve(), out.resolve())).as_posix()


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def write_description(out: Path, model_uri: str, source_root: Path | None) -> None:
    """``dataset_description.json`` of the derivatives dataset (rewritten with each run)."""
    from anomaly3d_core import __version__

    model = model_reference(model_uri, out)
    description: dict[str, Any] = {
        "Name": "anomaly3d voxel-wise anomaly scores",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "anomaly3d",
                "Version": __version__,
                "Description": f"unsupervised anomaly detection; model {model}",
            }
        ],
    }
    if source_root is not None:
        relative = Path(os.path.relpath(source_root.resolve(), out.resolve())).as_posix()
        description["DatasetLinks"] = {"raw": relative}
        description["SourceDatasets"] = [{"URL": "bids:raw:"}]
    _write_json(out / "dataset_description.json", description)


def write_sidecar(path: Path, row: Mapping[str, Any], model_uri: str, sources: list[str]) -> None:
    """The JSON sidecar of a score map: the subject's decision and where it came from
    (``model_uri`` as :func:`model_reference` gives it)."""
    sidecar = {
        "Description": "voxel-wise anomaly score (higher is more abnormal); the mask is made by MaskRule",
        "VolumeScore": row["volume_score"],
        "ScanStatistic": row["scan_statistic"],
        "VolumeThreshold": _json_number(row["volume_threshold"]),
        "PValue": _json_number(row["p_value"]),
        "Alpha": _json_number(row["alpha"]),
        "IsAnomalous": bool(row["is_anomalous"]),
        "DecisionRule": row["decision_rule"],
        "NCalibrationScans": row["n_calibration"],
        "MaskRule": row["mask_rule"],
        "VoxelThreshold": row["voxel_threshold"],
        "NLesions": row["n_lesions"],
        "Model": model_uri,
        "Sources": sources,
    }
    _write_json(path, sidecar)


def write_mask_sidecar(path: Path, row: Mapping[str, Any], score_map: str) -> None:
    """The JSON sidecar of a mask: what its voxels mean and the map it was cut from."""
    _write_json(
        path,
        {
            "Description": f"voxels flagged anomalous by the model's mask rule ({row['mask_rule']}; see "
            "README, Decisions with stated error rates)",
            "Type": "Lesion",
            "MaskRule": row["mask_rule"],
            "VoxelThreshold": row["voxel_threshold"],
            "Sources": [f"bids::{score_map}"],
        },
    )


def write_scores_tsv(out: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """``scores.tsv`` (BIDS tabular file: ``n/a`` for blanks) and ``scores.json`` describing its columns."""
    names = ["participant_id", "session_id", *[c for c in columns if c not in ("file", "subject", "session")]]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        values = {**row, "participant_id": row.get("subject"), "session_id": row.get("session")}
        writer.writerow(["n/a" if values.get(c) in (None, "") else values[c] for c in names])
    atomic_write(out / SCORES_TSV, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))
    _write_json(
        out / SCORES_TSV.replace(".tsv", ".json"),
        {c: COLUMN_DESCRIPTIONS.get(c, {"Description": c}) for c in names},
    )


def write_pmap_sidecar(path: Path, row: Mapping[str, Any], score_map: str) -> None:
    """The JSON sidecar of a voxel p-value map: what its values are and how many normals made them."""
    _write_json(
        path,
        {
            "Description": "conformal voxel p-values of the anomaly score against the calibration normals' "
            "voxels at the same depth from the brain's edge (or the same place on a shared grid); 1 outside "
            "the brain",
            "NCalibrationScans": row["n_calibration"],
            "Sources": [f"bids::{score_map}"],
        },
    )


def _json_number(value: Any) -> float | str | None:
    """A CSV cell as JSON: numbers stay numbers, infinity as the string "inf", empty as null."""
    if value == "" or value is None:
        return None
    value = float(value)
    return value if abs(value) != float("inf") else str(value)
