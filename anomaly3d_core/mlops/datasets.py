"""Scan sets as MLflow dataset inputs, so a run records what it trained, calibrated and was scored on.

A :class:`ScanSet` is a list of scans, each a file (a DICOM series folder counts as one file) or a
subject with one file per sequence, with an optional folder of ground-truth masks. Its digest is a SHA-256 over every file's name (relative
to the set's folder) and content, so two runs whose data differ in one voxel of one scan show
different digests in the MLflow UI. The profile carries the number of scans, the sequences (BIDS
suffixes such as ``T1w`` or ``FLAIR`` that a subject's files or the file names give, else
``unnamed``), the formats, the size and the masks folder; :meth:`ScanSet.listing` is the per-file record logged next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import get_dataset_source_from_json

from anomaly3d_core.mlops.naming import common_folder, set_name

# BIDS anatomical suffixes (and the common non-BIDS spellings) that name a scan's sequence
SEQUENCES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "PD", "T1", "T2", "T1ce", "T1Gd", "SWI", "DWI", "CT")
_SEQUENCE = re.compile(r"[_-](" + "|".join(SEQUENCES) + r")$", re.IGNORECASE)
_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd", ".npy", ".npz", ".dcm")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints); for a folder (DICOM series), of every
    file's relative name and bytes in name order."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def scan_format(path: Path) -> str:
    """The scan's extension (``.nii.gz``), ``dicom`` for a series folder."""
    if path.is_dir():
        return "dicom"
    low = path.name.lower()
    return next((e for e in _EXTENSIONS if low.endswith(e)), path.suffix.lower() or "none")


def scan_sequence(path: Path) -> str | None:
    """The sequence a file name states (``sub-01_FLAIR.nii.gz`` -> ``FLAIR``), else ``None``."""
    name = path.name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    found = _SEQUENCE.search(name)
    if not found:
        return None
    return next(s for s in SEQUENCES if s.lower() == found.group(1).lower())


def scan_files(item: Any) -> list[tuple[Path, str | None]]:
    """``(file, sequence)`` of a scan: a subject's file per sequence, or one file."""
    files = getattr(item, "files", None)
    if isinstance(files, dict):
        return [(Path(f), seq) for seq, f in sorted(files.items()) if isinstance(f, str | Path)]
    return [(Path(item), scan_sequence(Path(item)))]


def item_keys(item: Any) -> set[str]:
    """The names a batch may report a scan under: its path, or a subject's name and file paths."""
    keys = {str(item)}
    for f, _ in scan_files(item):
        keys |= {str(f), os.path.abspath(f)}
    return keys


def leave_out(items: Iterable[Any], names: Iterable[Any]) -> list[Any]:
    """``items`` without those reported under any of ``names`` (failed or held-out scans)."""
    drop = {str(n) for n in names} | {os.path.abspath(str(n)) for n in names}
    return [i for i in items if not item_keys(i) & drop]


def pick(items: Iterable[Any], names: Iterable[Any]) -> list[Any]:
    """The ``items`` reported under any of ``names``."""
    want = {str(n) for n in names} | {os.path.abspath(str(n)) for n in names}
    return [i for i in items if item_keys(i) & want]


class ScanSet(Dataset):
    """Scan files (and optionally their ground-truth masks) as one MLflow dataset."""

    def __init__(
        self,
        items: Sequence[Any],
        name: str | None = None,
        masks: str | Path | None = None,
        source: str | Path | None = None,
    ) -> None:
        self.items = list(items)
        self.files = sorted({f for i in self.items for f, _ in scan_files(i)}, key=os.path.abspath)
        self.masks = Path(masks) if masks is not None else None
        self.folder = Path(os.path.abspath(source)) if source is not None else common_folder(self.files)
        uri = json.dumps({"uri": str(self.folder)})
        super().__init__(
            source=get_dataset_source_from_json(uri, "local"), name=name or set_name(self.folder)
        )

    def _relative(self, path: Path, root: Path) -> str:
        full = os.path.abspath(path)
        rel = os.path.relpath(full, root)
        return Path(rel).as_posix() if not rel.startswith("..") else full

    @cached_property
    def _records(self) -> list[dict[str, Any]]:
        rows = [
            {
                "role": "scan",
                "subject": str(item) if hasattr(item, "files") else None,
                "file": self._relative(p, self.folder),
                "bytes": _size(p),
                "sha256": file_sha256(p),
                "sequence": sequence,
            }
            for item in self.items
            for files in [scan_files(item)]
            for p, sequence in files
        ]
        rows.sort(key=lambda r: r["file"])
        if self.masks is not None and self.masks.is_dir():
            for m in sorted(f for f in self.masks.iterdir() if f.is_file() and not f.name.startswith(".")):
                rows.append(
                    {
                        "role": "mask",
                        "subject": None,
                        "file": f"masks/{m.name}",
                        "bytes": m.stat().st_size,
                        "sha256": file_sha256(m),
                        "sequence": None,
                    }
                )
        return rows

    def _compute_digest(self) -> str:
        h = hashlib.sha256()
        for row in self._records:
            h.update(f"{row['role']}\0{row['file']}\0{row['sequence']}\0{row['sha256']}\n".encode())
        return h.hexdigest()[:16]

    @property
    def sequences(self) -> list[str]:
        found = sorted({r["sequence"] for r in self._records if r["role"] == "scan" and r["sequence"]})
        return found or ["unnamed"]

    @property
    def profile(self) -> dict[str, Any]:
        scans = [r for r in self._records if r["role"] == "scan"]
        return {
            "num_scans": len(self.items),
            "num_files": len(scans),
            "sequences": self.sequences,
            "formats": sorted({scan_format(p) for p in self.files}),
            "size_mb": round(sum(r["bytes"] for r in scans) / 2**20, 3),
            "num_masks": sum(r["role"] == "mask" for r in self._records),
            "masks_folder": str(self.masks.resolve()) if self.masks is not None else None,
        }

    @property
    def schema(self) -> None:
        return None  # scans are files, not a table with columns

    def to_dict(self) -> dict[str, str]:
        out = super().to_dict()
        out["profile"] = json.dumps(self.profile)
        return out

    def listing(self) -> dict[str, Any]:
        """What the set holds, file by file: logged as ``datasets/<context>.json``."""
        return {
            "name": self.name,
            "digest": self.digest,
            "source": str(self.folder),
            **self.profile,
            "files": self._records,
        }
