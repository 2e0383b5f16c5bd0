"""Results of a BIDS input written as a BIDS-Derivatives dataset.

Layout of ``OUT`` (the derivatives dataset's root, e.g. ``bids/derivatives/anomaly3d``)::

    dataset_description.json           DatasetType "derivative", GeneratedBy anomaly3d and the model
    scores.csv                         one row per subject (and session), as for any input
    sub-01/[ses-1/]anat/
      sub-01[_ses-1]_space-<ref>_stat-anomaly_statmap.nii.gz   voxel scores
      sub-01[_ses-1]_space-<ref>_stat-anomaly_statmap.json     volume score and threshold, p-value,
                                                                alpha, decision, mask rule, model, sources
      sub-01[_ses-1]_space-<ref>_stat-pvalue_statmap.nii.gz    voxel p-values (calibration normals)
      sub-01[_ses-1]_space-<ref>_desc-anomaly_mask.nii.gz      voxels flagged anomalous
      sub-01[_ses-1]_space-<ref>_desc-anomaly_lesions.tsv      one row per flagged cluster

``space-<ref>`` is the reference sequence (``space-T1w``: on the subject's own T1w grid, as
fMRIPrep names it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anomaly3d_core.io.files import atomic_write
from anomaly3d_core.io.subjects import Subject

BIDS_VERSION = "1.9.0"


def derivative_names(subject: Subject, reference: str) -> dict[str, str]:
    """Paths (relative to the derivatives root) of a subject's score map, p-map, mask, lesion table and sidecar."""
    folder = f"sub-{subject.subject}/" + (f"ses-{subject.session}/" if subject.session else "") + "anat/"
    base = f"{folder}{subject.stem}_space-{reference}"
    return {
        "score_map": f"{base}_stat-anomaly_statmap.nii.gz",
        "p_map": f"{base}_stat-pvalue_statmap.nii.gz",
        "mask": f"{base}_desc-anomaly_mask.nii.gz",
        "lesion_table": f"{base}_desc-anomaly_lesions.tsv",
        "sidecar": f"{base}_stat-anomaly_statmap.json",
    }


def bids_uri(path: str | Path, root: Path | None) -> str:
    """``bids:raw:sub-01/anat/...`` for a file of the source dataset, else the path as it is."""
    if root is not None:
        try:
            return "bids:raw:" + Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def write_description(out: Path, model_uri: str, source_root: Path | None) -> None:
    """``dataset_description.json`` of the derivatives dataset (rewritten with each run)."""
    from anomaly3d_core import __version__

    description: dict[str, Any] = {
        "Name": "anomaly3d voxel-wise anomaly scores",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "anomaly3d",
                "Version": __version__,
                "Description": f"unsupervised anomaly detection; model {model_uri}",
            }
        ],
    }
    if source_root is not None:
        description["DatasetLinks"] = {"raw": source_root.resolve().as_uri()}
        description["SourceDatasets"] = [{"URL": source_root.resolve().as_uri()}]
    atomic_write(
        out / "dataset_description.json", lambda tmp: Path(tmp).write_text(json.dumps(description, indent=2))
    )


def write_sidecar(path: Path, row: dict[str, Any], model_uri: str, sources: list[str]) -> None:
    """The JSON sidecar of a score map: the subject's decision and where it came from."""
    sidecar = {
        "Description": "voxel-wise anomaly score (higher is more abnormal); the mask is made by MaskRule",
        "VolumeScore": row["volume_score"],
        "ScanStatistic": row["scan_statistic"],
        "VolumeThreshold": _json_number(row["volume_threshold"]),
        "PValue": _json_number(row["p_value"]),
        "Alpha": _json_number(row["alpha"]),
        "IsAnomalous": bool(row["is_anomalous"]),
        "NCalibrationScans": row["n_calibration"],
        "MaskRule": row["mask_rule"],
        "VoxelThreshold": row["voxel_threshold"],
        "NLesions": row["n_lesions"],
        "Model": model_uri,
        "Sources": sources,
    }
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2)))


def _json_number(value: Any) -> float | str | None:
    """A CSV cell as JSON: numbers stay numbers, infinity as the string "inf", empty as null."""
    if value == "" or value is None:
        return None
    value = float(value)
    return value if abs(value) != float("inf") else str(value)
