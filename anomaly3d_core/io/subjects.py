"""Subjects with one or more sequences, and the ways to list them.

A :class:`Subject` names one file per sequence (``{"T1w": ..., "FLAIR": ...}``). They are found in

- a BIDS dataset (a folder with ``dataset_description.json`` or ``sub-*`` folders):
  ``sub-<label>/[ses-<label>/]anat/sub-<label>[_ses-<label>][_<key>-<value>...]_<suffix>.nii[.gz]``,
  the suffix naming the sequence (``T1w``, ``T2w``, ``FLAIR``, ...);
- a CSV manifest with the columns ``subject``, ``sequence``, ``path`` (and optionally ``session``),
  relative paths taken from the manifest's folder;
- a plain folder of ``<subject>_<sequence>.<ext>`` files;
- in Python, a list of mappings ``{"T1w": path_or_volume, "FLAIR": ...}``.

BIDS is read by :func:`bids_subjects`, a parser of the file-name rules for raw anatomical data
(entities, suffix, extension) rather than pybids: grouping anatomical files by subject, session
and suffix is all that is needed, and pybids would add an SQL index of the whole dataset and a
dozen dependencies to every install.

A subject that lacks a sequence, or has two files for one, is reported with its name and the
reason in the returned :class:`~anomaly3d_core.io.data.BatchFailures`; the others go on.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly3d_core.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ENTITY = re.compile(r"^[a-zA-Z]+-[a-zA-Z0-9]+$")
MANIFEST_COLUMNS = ("subject", "sequence", "path")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a subject or session label: names files, never a path


@dataclass
class Subject:
    """One subject (and session): a file, or an in-memory volume, for each sequence.

    ``stem`` names its outputs: ``sub-01_ses-2`` for BIDS input, the subject (and session) as given
    otherwise. ``entities`` keeps the BIDS entities that made the stem, for BIDS-Derivatives output.
    """

    subject: str
    files: dict[str, Any]
    session: str | None = None
    bids: bool = False
    entities: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        if self.bids:
            return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")
        return self.subject + (f"_{self.session}" if self.session else "")

    def __str__(self) -> str:
        return self.stem

    def reference_file(self, channels: Sequence[str]) -> str | None:
        """The reference sequence's file (the name messages and ``scores.csv`` use)."""
        first = self.files.get(channels[0]) if channels else None
        return str(first) if isinstance(first, str | Path) else None

    def check(self, channels: Sequence[str]) -> None:
        """Refuse a subject without every sequence in ``channels``, naming what it has."""
        missing = [s for s in channels if s not in self.files]
        if missing:
            have = ", ".join(sorted(self.files)) or "none"
            raise DataError(
                self.stem,
                f"no {' or '.join(missing)} file for this subject (it has: {have}); every subject needs "
                f"all of {', '.join(channels)}",
            )


def parse_bids_name(name: str) -> tuple[dict[str, str], str] | None:
    """``({entity: label}, suffix)`` of a BIDS NIfTI file name, or ``None`` when it is not one."""
    stem = next((name[: -len(ext)] for ext in NIFTI_SUFFIXES if name.endswith(ext)), None)
    if stem is None:
        return None
    *pairs, suffix = stem.split("_")
    if not pairs or not suffix.isalnum() or not all(_ENTITY.match(p) for p in pairs):
        return None
    entities = dict(p.split("-", 1) for p in pairs)
    if list(entities)[0] != "sub" or len(entities) != len(pairs):
        return None
    return entities, suffix


def is_bids_root(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_description.json").is_file()
        or any(path.glob("sub-*/anat"))
        or any(path.glob("sub-*/ses-*/anat"))
    )


def bids_subjects(root: str | Path, channels: Sequence[str]) -> tuple[list[Subject], list[DataError]]:
    """The subjects (one per subject and session) of a BIDS dataset with the sequences in ``channels``."""
    root = Path(root)
    found: dict[tuple[str, str | None], dict[str, list[Path]]] = {}
    for anat in sorted([*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]):
        for f in sorted(anat.iterdir()):
            parsed = parse_bids_name(f.name)
            if parsed is None or f.name.startswith("."):
                continue
            entities, suffix = parsed
            key = (entities["sub"], entities.get("ses"))
            found.setdefault(key, {}).setdefault(suffix, []).append(f)
    subjects, errors = [], []
    for (sub, ses), by_suffix in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        subject = Subject(sub, {}, ses, bids=True, entities={"sub": sub, **({"ses": ses} if ses else {})})
        try:
            for seq in channels:
                files = by_suffix.get(seq, [])
                if len(files) > 1:
                    raise DataError(
                        subject.stem,
                        f"{len(files)} {seq} files ({', '.join(f.name for f in files)}); keep one, or list the "
                        "one to use in a manifest (subject, sequence, path)",
                    )
                if files:
                    subject.files[seq] = files[0]
            subject.check(channels)
        except DataError as exc:
            errors.append(exc)
            continue
        subjects.append(subject)
    if not found:
        raise DataError(
            root, "BIDS dataset without anatomical scans (no sub-*/[ses-*/]anat/*.nii[.gz] files)"
        )
    return subjects, errors


def manifest_subjects(path: str | Path, channels: Sequence[str]) -> tuple[list[Subject], list[DataError]]:
    """Subjects from a CSV with ``subject, sequence, path[, session]`` rows (other sequences are ignored)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"manifest cannot be read ({exc})") from None
    columns = set(rows[0]) if rows else set()
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            path,
            f"manifest lacks column(s) {', '.join(missing)}; it needs subject, sequence, path (and may have session)",
        )
    grouped: dict[tuple[str, str | None], dict[str, list[Path]]] = {}
    empty: list[DataError] = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        sub, seq = (row["subject"] or "").strip(), (row["sequence"] or "").strip()
        ses = (row.get("session") or "").strip() or None
        if not sub or not seq or not (row["path"] or "").strip():
            blank = [c for c in MANIFEST_COLUMNS if not (row[c] or "").strip()]
            empty.append(DataError(path, f"line {number}: empty {', '.join(blank)}; the row is skipped"))
            continue
        bad = next((label for label in (sub, ses) if label is not None and not LABEL.fullmatch(label)), None)
        if bad is not None:
            empty.append(
                DataError(
                    path,
                    f"line {number}: '{bad}' cannot name outputs (letters, digits, '.', '_', '+' and '-' only, "
                    "not starting with '.'); the row is skipped",
                )
            )
            continue
        file = Path(row["path"].strip())
        grouped.setdefault((sub, ses), {}).setdefault(seq, []).append(
            file if file.is_absolute() else Path(os.path.normpath(path.parent / file))
        )
    subjects, errors = _group(grouped, channels, bids=False)
    return subjects, empty + errors


def folder_subjects(folder: str | Path, channels: Sequence[str]) -> tuple[list[Subject], list[DataError]]:
    """Subjects from ``<subject>_<sequence>.nii[.gz]`` (or any scan extension) files in one folder."""
    folder = Path(folder)
    grouped: dict[tuple[str, str | None], dict[str, list[Path]]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        base = f.name.split(".", 1)[0]
        sub, sep, seq = base.rpartition("_")
        if sep and sub and seq in channels:
            grouped.setdefault((sub, None), {}).setdefault(seq, []).append(f)
    if not grouped:
        raise DataError(
            folder,
            f"no <subject>_<sequence> scans for sequences {', '.join(channels)} (e.g. s01_{channels[0]}.nii.gz); "
            "a BIDS dataset needs its dataset_description.json, a manifest ends in .csv",
        )
    return _group(grouped, channels, bids=False)


def _group(
    grouped: dict[tuple[str, str | None], dict[str, list[Path]]], channels: Sequence[str], bids: bool
) -> tuple[list[Subject], list[DataError]]:
    subjects, errors = [], []
    for (sub, ses), by_seq in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        subject = Subject(sub, {}, ses, bids=bids)
        clash = next((s for s in channels if len(by_seq.get(s, [])) > 1), None)
        if clash is not None:
            names = ", ".join(str(p) for p in by_seq[clash])
            errors.append(
                DataError(subject.stem, f"{len(by_seq[clash])} files claim its {clash}: {names}; keep one")
            )
            continue
        subject.files = {s: by_seq[s][0] for s in channels if s in by_seq}
        try:
            subject.check(channels)
        except DataError as exc:
            errors.append(exc)
            continue
        subjects.append(subject)
    return subjects, errors


def find_subjects(
    spec: str | Path, channels: Sequence[str]
) -> tuple[list[Subject], list[DataError], Path | None]:
    """Subjects from a BIDS dataset, a CSV manifest or a folder; returns ``(subjects, errors, bids_root)``."""
    p = Path(spec)
    if not p.exists():
        raise DataError(
            p, "no such file or folder (give a BIDS dataset, a subject,sequence,path CSV or a folder)"
        )
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise DataError(
                p,
                f"a file of one sequence cannot be a subject with {', '.join(channels)}; give a folder or a .csv manifest",
            )
        subjects, errors = manifest_subjects(p, channels)
        root = None
    elif is_bids_root(p):
        subjects, errors = bids_subjects(p, channels)
        root = p
    else:
        subjects, errors = folder_subjects(p, channels)
        root = None
    if not subjects and not errors:
        raise DataError(p, f"no subject with {', '.join(channels)} found")
    return subjects, errors, root


def as_subject(item: Mapping[str, Any] | Subject, index: int = 0) -> Subject:
    """A :class:`Subject` from a ``{sequence: path_or_volume}`` mapping (the Python API's form)."""
    if isinstance(item, Subject):
        return item
    files = dict(item)
    seq, first = next(iter(files.items()), (None, None))
    name = Path(str(first)).name.split(".", 1)[0] if isinstance(first, str | Path) else f"subject-{index}"
    name = name[: -len(seq) - 1] if seq and name.endswith(f"_{seq}") and len(name) > len(seq) + 1 else name
    parsed = parse_bids_name(Path(str(first)).name) if isinstance(first, str | Path) else None
    if parsed is not None:
        entities = parsed[0]
        return Subject(
            entities["sub"],
            files,
            entities.get("ses"),
            bids=True,
            entities={k: entities[k] for k in ("sub", "ses") if k in entities},
        )
    return Subject(name, files)
