"""Readable names for scan sets: what a folder of scans is called in run names and dataset inputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# folder names that say which split a folder is, not which data set: the parent names the data set
SPLIT_NAMES = {
    *("train", "training", "test", "testing", "val", "valid", "validation", "eval", "evaluation"),
    *("normals", "scans", "images", "inputs", "input", "masks", "anat"),
}


def common_folder(paths: Sequence[str | Path]) -> Path:
    """The deepest folder holding every path."""
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


def data_folder(spec: str | Path) -> Path:
    """The folder a ``--train``/``--input`` argument names: itself, a glob's folder, a file's folder."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        text = text[: min(text.index(ch) for ch in "*?[" if ch in text)]
        return Path(os.path.abspath(text if text.endswith(os.sep) else os.path.dirname(text) or "."))
    path = Path(os.path.abspath(text))
    return path if path.is_dir() else path.parent


_GENERIC = {"data", "dataset", "datasets", "raw", "nifti", "bids", "derivatives"}


def set_name(folder: str | Path) -> str:
    """A readable name for the scans in ``folder``: its name, or, when the folder only names a split,
    the nearest ancestor that is not a generic folder name and the split (``brats/train`` for
    ``/srv/brats/train``, ``demo_output/test`` for ``demo_output/data/test``)."""
    folder = Path(os.path.abspath(folder))
    if folder.name.lower() not in SPLIT_NAMES:
        return folder.name or str(folder)
    parent = folder.parent
    while parent.name.lower() in _GENERIC | SPLIT_NAMES and parent.parent != parent:
        parent = parent.parent
    return f"{parent.name}/{folder.name}" if parent.name else folder.name
