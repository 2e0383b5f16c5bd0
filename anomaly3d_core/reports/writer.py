"""Where reports go and what they are built from, for a batch of scored (or evaluated) scans.

A BIDS-Derivatives output gets ``sub-01[_ses-1].html`` at its root (as fMRIPrep names them); any
other output ``<stem>_report.html`` beside the maps. The group page is ``report.html``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from anomaly3d_core.io.files import output_path
from anomaly3d_core.reports.group import group_report
from anomaly3d_core.reports.subject import model_facts, subject_report, write_subject_report

GROUP_REPORT = "report.html"


def subject_report_name(stem: str, bids: bool) -> str:
    return f"{stem}.html" if bids else f"{stem}_report.html"


class ReportWriter:
    """Writes one subject report per scored scan and, at the end, the group report of a folder."""

    def __init__(
        self, out_dir: Path, detector: Any, model_uri: str = "", sequences: Sequence[str] = ()
    ) -> None:
        self.out_dir = Path(out_dir)
        self.model = model_facts(detector, model_uri)
        self.model |= _lineage(model_uri)
        self.sequences = list(sequences)
        self.hrefs: dict[str, str] = {}
        self.extras: dict[str, dict[str, Any]] = {}

    def subject(
        self,
        result: Any,
        row: Mapping[str, Any],
        name: str,
        *,
        bids: bool = False,
        truth: np.ndarray | None = None,
        folder: Path | None = None,
    ) -> Path:
        """Write ``name``'s report (into ``folder``, default the output root) and remember its link."""
        path = output_path(folder or self.out_dir, subject_report_name(name, bids))  # kept under the output
        group_href = os.path.relpath(self.out_dir / GROUP_REPORT, path.parent)
        text = subject_report(
            result,
            row,
            name,
            self.model,
            sequences=self.sequences,
            truth=truth,
            group_href=group_href,
            base=self.out_dir,
        )
        write_subject_report(path, text)
        self.hrefs[name] = os.path.relpath(path, self.out_dir)
        labels, n = ndimage.label(np.asarray(result.mask) > 0, np.ones((3, 3, 3), bool))
        self.extras[name] = {"flagged_voxels": int(np.asarray(result.mask).sum()), "clusters": int(n)}
        return path

    def add_from_folder(self, rows: Sequence[Mapping[str, Any]], names: Sequence[str], bids: bool) -> None:
        """Links and cluster counts of scans scored by earlier runs, from the reports and masks on disk."""
        import nibabel as nib

        for row, name in zip(rows, names, strict=True):
            report = self.out_dir / subject_report_name(name, bids)
            if report.is_file():
                self.hrefs.setdefault(name, os.path.relpath(report, self.out_dir))
            if name not in self.extras and row.get("mask"):
                mask = np.asarray(nib.load(self.out_dir / row["mask"]).dataobj) > 0
                n = ndimage.label(mask, np.ones((3, 3, 3), bool))[1]
                self.extras[name] = {"flagged_voxels": int(mask.sum()), "clusters": int(n)}

    def group(
        self,
        rows: Sequence[Mapping[str, Any]],
        names: Sequence[str],
        *,
        evaluation: Mapping[str, Any] | None = None,
        figures: Sequence[tuple[str, str]] = (),
    ) -> Path:
        """Write ``report.html`` over ``rows`` (named ``names``, for links and extras)."""
        full = [
            {**row, **self.extras.get(name, {}), "name": name} for row, name in zip(rows, names, strict=True)
        ]
        text = group_report(full, self.model, hrefs=self.hrefs, evaluation=evaluation, figures=figures)
        return write_subject_report(self.out_dir / GROUP_REPORT, text)


def _lineage(model_uri: str) -> dict[str, str]:
    """The MLflow run and logged model behind a model folder, when its MLmodel (or metadata.json) says them."""
    if not model_uri or not Path(model_uri).is_dir():
        return {}
    from anomaly3d_core.provenance import read_lineage

    found = read_lineage(model_uri)
    labels = {
        "run_name": "MLflow run",
        "run_id": "MLflow run id",
        "model_uri": "MLflow model",
        "config": "config",
    }
    return {label: found[key] for key, label in labels.items() if found.get(key)}
