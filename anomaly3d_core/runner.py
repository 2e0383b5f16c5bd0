"""Batch work behind the CLI: fit from files, score folders, evaluate against masks.

Every batch carries on past bad files, whatever they raise, and returns them as
:class:`BatchFailures`. Outputs are named by :func:`~anomaly3d_core.io.files.output_stems` (unique
per input, checked before any work), and ``scores.csv`` gains each row as soon as its maps are
in place, so it always describes the maps on disk, also after an interruption or when two runs
write into one folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.detector import Detector, ScoreResult
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.data import BatchFailures
from anomaly3d_core.io.derivatives import (
    bids_uri,
    derivative_names,
    model_reference,
    write_description,
    write_mask_sidecar,
    write_pmap_sidecar,
    write_scores_tsv,
    write_sidecar,
)
from anomaly3d_core.io.files import (
    atomic_write,
    output_path,
    output_stems,
    save_nifti,
    scan_stem,
    write_lock,
)
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.postprocess.lesions import write_lesion_table
from anomaly3d_core.preprocess.registration import registration_quality
from anomaly3d_core.progress import progress
from anomaly3d_core.scores import SCORES_COLUMNS

log = logging.getLogger(__name__)
CSV_FIELDS = SCORES_COLUMNS  # the columns of scores.csv, shared with the served model


@dataclass
class ScoredBatch:
    rows: list[dict[str, Any]] = field(default_factory=list)
    results: list[ScoreResult] = field(default_factory=list)
    failures: BatchFailures = field(default_factory=BatchFailures)


def write_result(
    result: ScoreResult, out_dir: Path, stem: str | None = None, names: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write the score map, p-map, mask and lesion table on the input's grid; returns the CSV row.

    Named ``<stem>_score.nii.gz``, ``<stem>_pvalue.nii.gz``, ``<stem>_mask.nii.gz`` and
    ``<stem>_lesions.tsv``, or as ``names`` says (BIDS-Derivatives). A model without calibration
    nulls writes no p-map and no lesion table (their cells stay empty).
    """
    stem = stem or scan_stem(result.volume.path or "volume")
    names = names or {
        "score_map": f"{stem}_score.nii.gz",
        "p_map": f"{stem}_pvalue.nii.gz",
        "mask": f"{stem}_mask.nii.gz",
        "lesion_table": f"{stem}_lesions.tsv",
    }
    save_nifti(
        result.score_map.astype(np.float32), result.volume.affine, output_path(out_dir, names["score_map"])
    )
    save_nifti(result.mask.astype(np.uint8), result.volume.affine, output_path(out_dir, names["mask"]))
    calibrated = result.p_map is not None
    if calibrated:
        save_nifti(
            result.p_map.astype(np.float32), result.volume.affine, output_path(out_dir, names["p_map"])
        )
        write_lesion_table(result.lesions, output_path(out_dir, names["lesion_table"]))
    return {
        "file": result.volume.path,
        **decision_columns(result),
        "score_map": names["score_map"],
        "p_map": names["p_map"] if calibrated else "",
        "mask": names["mask"],
        "lesion_table": names["lesion_table"] if calibrated else "",
        **{k: round(v, 4) for k, v in registration_quality(result.prepared).items()},
    }


def decision_columns(result: ScoreResult) -> dict[str, Any]:
    """The scan's numbers and decision as ``scores.csv``, the sidecar and the served response name them.

    A NaN or infinite volume score is an error (never a decision); an undefined p-value (a model
    without calibration nulls) is an empty cell.
    """
    if not np.isfinite(result.volume_score):
        raise DataError(
            result.volume.path, f"volume score {result.volume_score}: not a finite number, no decision"
        )

    def num(value: float) -> float | str:
        return round(float(value), 6) if np.isfinite(value) or np.isinf(value) else ""

    return {
        "volume_score": round(float(result.volume_score), 6),
        "volume_threshold": num(result.volume_threshold),
        "p_value": num(result.p_value),
        "alpha": num(result.alpha),
        "is_anomalous": bool(result.is_anomalous),
        "decision_rule": result.decision_rule,
        "scan_statistic": result.scan_statistic,
        "n_calibration": int(result.n_calibration),
        "mask_rule": result.mask_rule,
        "voxel_threshold": round(float(result.threshold), 6),
        "n_lesions": len(result.lesions),
    }


def write_csv(
    rows: list[dict[str, Any]],
    path: Path,
    fields: tuple[str, ...] = CSV_FIELDS,
) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def read_scores(out_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``out_dir/scores.csv`` whose files (maps, mask, lesion table) are on disk (others are dropped)."""
    path = out_dir / "scores.csv"
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("score_map") and row.get("file"):  # a CSV from before these columns
                stem = scan_stem(row["file"])
                row["score_map"], row["mask"] = f"{stem}_score.nii.gz", f"{stem}_mask.nii.gz"
            if row.get("threshold") and not row.get("voxel_threshold"):  # a CSV from before p-values
                row["voxel_threshold"] = row.pop("threshold")
            files = [row.get(c) for c in ("score_map", "mask", "p_map", "lesion_table") if row.get(c)]
            if row.get("score_map") and row.get("mask") and all((out_dir / f).is_file() for f in files):
                rows.append(row)
    return rows


def record_row(out_dir: Path, row: dict[str, Any]) -> None:
    """Add (or replace) one row of ``scores.csv``, atomically, under a lock shared by concurrent runs."""
    record_rows(out_dir, [row])


def record_rows(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Add (or replace, by score map) rows of ``scores.csv``, atomically, under the same lock."""
    with write_lock(out_dir / "scores.csv", "scores.csv", blocking=True):
        names = {row["score_map"] for row in rows}
        kept = [r for r in read_scores(out_dir) if r["score_map"] not in names]
        write_csv([*kept, *rows], out_dir / "scores.csv")


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back until the block ends, so maps and their CSV row are written together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: pending.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def subject_columns(subject: Subject) -> dict[str, str]:
    """``scores.csv``'s subject and session: BIDS's ``sub-01``/``ses-1`` form for BIDS input, else as given."""
    if subject.bids:
        return {
            "subject": f"sub-{subject.subject}",
            "session": f"ses-{subject.session}" if subject.session else "",
        }
    return {"subject": subject.subject, "session": subject.session or ""}


class _InThisThread(contextlib.AbstractContextManager):
    """An executor that runs each task at once, in the calling thread (``score_files(overlap=False)``)."""

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done


def score_files(
    pipeline: Detector,
    inputs: list[Path | Subject],
    out_dir: Path,
    keep_results: bool = False,
    bids_root: Path | None = None,
    model_uri: str = "",
    reports: bool = True,
    overlap: bool = True,
) -> ScoredBatch:
    """Score every input (a file or a subject), write its maps and its ``scores.csv`` row; bad inputs
    go to ``failures``. Subjects of a BIDS dataset (``bids_root``) are written as BIDS-Derivatives
    (:mod:`anomaly3d_core.io.derivatives`) with a JSON sidecar each. With ``reports``, each scan gets
    an HTML report and the folder a group report (:mod:`anomaly3d_core.reports`).

    The work runs as a three-stage pipeline that keeps the cores busy: while the network scores one
    scan, a reader thread reads and preprocesses the next and a writer thread writes the previous
    one's files (maps, row, sidecars, report). Results, their order and the per-file failures are
    those of scanning one by one (``overlap=False`` does exactly that, in this thread); at most
    three scans are in memory.
    """
    batch = ScoredBatch()
    reporter = report_writer(pipeline, out_dir, model_uri) if reports else None
    stem_of: dict[str, str] = {}
    stems = output_stems(inputs, pipeline.registry)  # a name clash refuses the batch before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    with write_lock(out_dir / "scores.csv", "scores.csv", blocking=True):
        write_csv(read_scores(out_dir), out_dir / "scores.csv")  # drop rows whose maps are gone

    def prepared(item: Path | Subject) -> Any:
        return pipeline.prepare(pipeline.read(item))

    def write(result: ScoreResult, path: Path | Subject, stem: str) -> dict[str, Any]:
        bids = isinstance(path, Subject) and path.bids and bids_root is not None
        names = derivative_names(path, pipeline.channels[0]) if bids else None
        with _uninterrupted():
            row = write_result(result, out_dir, stem, names)
            if isinstance(path, Subject):
                row |= subject_columns(path)
            if names is not None:
                sources = [bids_uri(f, bids_root) for f in path.files.values()]
                sidecar = output_path(out_dir, names["sidecar"])
                write_sidecar(sidecar, row, model_reference(model_uri, out_dir), sources)
                write_mask_sidecar(output_path(out_dir, names["mask_sidecar"]), row, names["score_map"])
                if row["p_map"]:
                    write_pmap_sidecar(output_path(out_dir, names["p_map_sidecar"]), row, names["score_map"])
            record_row(out_dir, row)
            if bids_root is not None:
                with write_lock(out_dir / "scores.csv", "scores.csv", blocking=True):
                    write_scores_tsv(out_dir, read_scores(out_dir), CSV_FIELDS)
        stem_of[row["score_map"]] = stem
        if reporter is not None:
            reporter.subject(result, row, stem, bids=names is not None)
        return row

    if bids_root is not None:
        write_description(out_dir, model_uri, bids_root)
    with (
        ThreadPoolExecutor(1, thread_name_prefix="anomaly3d-read") if overlap else _InThisThread() as reader,
        ThreadPoolExecutor(1, thread_name_prefix="anomaly3d-write") if overlap else _InThisThread() as writer,
    ):
        ahead = reader.submit(prepared, inputs[0]) if inputs else None
        written: Future[dict[str, Any]] | None = None
        pairs = list(zip(inputs, stems, strict=True))
        for index, (path, stem) in enumerate(progress(pairs, desc="scoring", total=len(inputs))):
            current = ahead  # read and preprocessed while the previous scan was scored
            ahead = reader.submit(prepared, inputs[index + 1]) if index + 1 < len(inputs) else None
            try:
                result = pipeline.score(current.result())
            except Exception as exc:  # one bad file never stops the batch, whatever it raises
                batch.failures.record(path, exc)
                continue
            if written is not None:  # one write at a time, in order; its errors stop the batch here
                batch.rows.append(written.result())
            written = writer.submit(write, result, path, stem)
            if keep_results:
                batch.results.append(result)
        if written is not None:
            batch.rows.append(written.result())
    if reporter is not None:
        rows = read_scores(out_dir)  # the group page describes every scan in the folder
        reporter.group(rows, [stem_of.get(r["score_map"]) or row_stem(r) for r in rows])
    return batch


def report_writer(pipeline: Detector, out_dir: Path, model_uri: str) -> Any:
    from anomaly3d_core.reports import ReportWriter

    return ReportWriter(out_dir, pipeline, model_uri, sequences=getattr(pipeline, "channels", []))


def row_stem(row: dict[str, Any]) -> str:
    """A name for a ``scores.csv`` row written by an earlier run: subject (and session), else the file's stem."""
    if row.get("subject"):
        return row["subject"] + (f"_{row['session']}" if row.get("session") else "")
    return scan_stem(row.get("file") or row["score_map"])
