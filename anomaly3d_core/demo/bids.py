"""Write a BIDS raw dataset (https://bids-specification.readthedocs.io): the files a validator expects.

Only what the demo needs: ``dataset_description.json``, ``README``, ``participants.tsv`` (+ JSON),
and ``sub-<label>/anat/sub-<label>_<suffix>.nii.gz`` with a JSON sidecar per image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.io.files import atomic_write, save_nifti

BIDS_VERSION = "1.9.0"
#: acquisition parameters of the synthetic protocol (seconds), written to each image's sidecar
SIDECARS: dict[str, dict[str, Any]] = {
    "T1w": {"RepetitionTime": 2.3, "EchoTime": 0.00298, "InversionTime": 0.9, "FlipAngle": 9},
    "T2w": {"RepetitionTime": 3.2, "EchoTime": 0.408, "FlipAngle": 120},
    "FLAIR": {"RepetitionTime": 9.0, "EchoTime": 0.081, "InversionTime": 2.5, "FlipAngle": 150},
}
_LABEL = re.compile(r"^[a-zA-Z0-9]+$")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def start_dataset(root: Path, name: str, description: str) -> None:
    """``dataset_description.json`` (raw dataset) and a ``README``."""
    from anomaly3d_core import __version__

    _write_json(
        root / "dataset_description.json",
        {
            "Name": name,
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "GeneratedBy": [{"Name": "anomaly3d demo data", "Version": __version__}],
        },
    )
    _write_text(root / "README", description.rstrip() + "\n")


def anat_path(root: Path, subject: str, suffix: str) -> Path:
    """``root/sub-<subject>/anat/sub-<subject>_<suffix>.nii.gz``."""
    if not _LABEL.match(subject):
        raise ValueError(f"BIDS subject label '{subject}' must be alphanumeric (no 'sub-', '-' or '_')")
    return root / f"sub-{subject}" / "anat" / f"sub-{subject}_{suffix}.nii.gz"


def write_anat(
    root: Path,
    subject: str,
    suffix: str,
    image: np.ndarray,
    affine: np.ndarray,
    extra: dict[str, Any] | None = None,
) -> Path:
    """One anatomical image and its JSON sidecar (protocol parameters plus ``extra``)."""
    path = anat_path(root, subject, suffix)
    save_nifti(image, affine, path)
    _write_json(
        path.with_name(path.name.replace(".nii.gz", ".json")), {**SIDECARS.get(suffix, {}), **(extra or {})}
    )
    return path


def write_participants(root: Path, subjects: list[str]) -> None:
    """``participants.tsv`` with one ``participant_id`` per subject, and its column description."""
    lines = ["participant_id", *(f"sub-{s}" for s in subjects)]
    _write_text(root / "participants.tsv", "\n".join(lines) + "\n")
    _write_json(
        root / "participants.json",
        {"participant_id": {"Description": "synthetic subject built from the MNI152 2009 template"}},
    )
