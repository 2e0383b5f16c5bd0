"""One request row of the pyfunc model: what it may hold, how its scan is read, where its maps go.

A row holds its scan as ``volume`` (base64 of a file) or ``path`` (a local path or an fsspec URI
that the worker reads, so a table of paths never carries images through a Spark driver), an
optional ``format`` and an optional ``out_dir`` (a folder or URI where the worker writes the
score map and mask). The columns are listed in :mod:`.schema`.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

from anomaly3d_core.detector import Detector, ScoreResult
from anomaly3d_core.errors import DataError
from anomaly3d_core.io import limits
from anomaly3d_core.io.files import check_volume, load_volume, loader_extensions, scan_stem
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.mlops.schema import RESPONSE_COLUMNS, STRING_COLUMNS, path_column
from anomaly3d_core.mlops.serving import decode_bytes, encode_nifti, loader_for_format, read_payload
from anomaly3d_core.postprocess.lesions import lesion_tsv
from anomaly3d_core.runner import write_result
from anomaly3d_core.scores import as_response, result_row


def text(value: Any) -> str | None:
    """A cell as stripped text, or None when empty (pandas and Spark give None or NaN for no value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    return value or None


def _file_columns(columns: Any) -> list[str]:
    return [c for c in columns if c in ("path", "out_dir") or str(c).endswith("_path")]


def is_batch(columns: Any) -> bool:
    """Whether a request scores a table (``path``, ``<sequence>_path`` or ``out_dir`` given): then each
    row carries its own ``error`` and the others are still scored, instead of one bad row failing the request."""
    return bool(_file_columns(columns))


def names_files(records: list[dict[str, Any]]) -> bool:
    """Whether any row names a file to read (``path``, ``<sequence>_path``) or a folder to write (``out_dir``)."""
    return any(text(r.get(c)) for r in records for c in _file_columns(r))


def read_row(row: dict[str, Any], index: int, detector: Detector) -> Volume | Subject:
    """The scan(s) of one request row, checked: ``volume`` (base64), ``path`` (path or URI), or one
    base64 column per sequence for a model of several."""
    fmt = text(row.get("format"))
    channels = detector.channels
    if len(channels) > 1:
        missing = [
            seq for seq in channels if text(row.get(seq)) is None and text(row.get(path_column(seq))) is None
        ]
        if missing:
            raise DataError(
                text(row.get("subject")),
                f"no {' or '.join(map(repr, missing))} in the row: a model of several sequences takes per "
                f"sequence a base64 column ({', '.join(channels)}) or a path column "
                f"({', '.join(map(path_column, channels))})",
            )
        scans = {}
        for seq in channels:
            if text(row.get(seq)) is not None:
                scans[seq] = _decode(row[seq], fmt, detector.registry, repr(seq))
                scans[seq].path = f"row {index} {seq}"
            else:
                scans[seq] = _read_path(text(row[path_column(seq)]), fmt, detector)
        return Subject(text(row.get("subject")) or f"row {index}", scans)
    path = text(row.get("path"))
    if text(row.get("volume")) is not None:
        volume = _decode(row["volume"], fmt, detector.registry, "'volume'")
        volume.path = f"row {index}"
        return volume
    if path is None:
        raise DataError(None, "the row has neither 'volume' (base64 of a scan) nor 'path' (a path or URI)")
    return _read_path(path, fmt, detector)


def _read_path(path: str, fmt: str | None, detector: Detector) -> Volume:
    """A scan a row names by path or URI: a local file read as ``anomaly3d score`` reads it, else through fsspec."""
    fs, key = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        local = path.removeprefix("file://")  # as given, so `file` reads as in `anomaly3d score`
        if fmt is None:
            return detector.read_file(local)  # exactly as `anomaly3d score` reads one file
        loader, _ = loader_for_format(fmt, detector.registry)
        return load_volume(local, loader.name, detector.registry)
    return _read_remote(fs, key, path, fmt, detector.registry)


def _decode(value: Any, fmt: str | None, registry: Any, label: str) -> Volume:
    return check_volume(read_payload(decode_bytes(value, label), fmt, registry, label))


def _read_remote(fs: Any, key: str, uri: str, fmt: str | None, registry: Any) -> Volume:
    """A one-file scan on an fsspec filesystem, its size checked before it is fetched."""
    cap = limits.current().max_bytes
    try:
        size = fs.size(key)
    except FileNotFoundError:
        raise DataError(uri, "file not found") from None
    if size is not None and size > cap + (1 << 20):  # a compressed file is never much larger than its content
        raise DataError(
            uri, f"file holds {size:,} bytes, above the limit of {cap:,} ({limits.ENV['max_bytes']})"
        )
    if fmt is None:
        low = uri.lower()
        fmt = next((ext for ext in loader_extensions(registry) if low.endswith(ext)), None)
    volume = check_volume(read_payload(fs.cat_file(key), fmt, registry, uri))
    volume.path = uri
    return volume


def write_maps(result: ScoreResult, out_dir: str, stem: str) -> dict[str, str]:
    """Write the score map, p-map, mask and lesion table into ``out_dir`` (a folder or fsspec URI);
    returns their locations by column (empty for files a model without calibration nulls has not).

    Local files are written to a temporary sibling and renamed, as ``anomaly3d score`` does; on
    another filesystem each file is uploaded whole (one PUT on an object store).
    """
    columns = ("score_map", "p_map", "mask", "lesion_table")
    fs, root = fsspec.core.url_to_fs(out_dir)
    if isinstance(fs, LocalFileSystem):
        root = out_dir.removeprefix("file://")
        row = write_result(result, Path(root), stem)
        return {c: str(Path(root) / row[c]) if row[c] else "" for c in columns}
    with tempfile.TemporaryDirectory(prefix="anomaly3d-maps-") as tmp:
        row = write_result(result, Path(tmp), stem)
        dest = out_dir.rstrip("/")
        for name in (row[c] for c in columns if row[c]):
            fs.put_file(str(Path(tmp) / name), f"{root.rstrip('/')}/{name}")
        return {c: f"{dest}/{row[c]}" if row[c] else "" for c in columns}


def output_stem(row: dict[str, Any], item: Volume | Subject, registry: Any) -> str:
    """The name a row's maps get: the scan's own stem, or for base64 rows one taken from the content
    (unique without any numbering that Spark's batches would repeat)."""
    if isinstance(item, Subject):
        if text(row.get("subject")):
            return text(row["subject"])
        payload = [row.get(seq) or row.get(path_column(seq)) for seq in item.files]
    elif text(row.get("volume")) is not None:
        payload = [row["volume"]]
    else:
        return scan_stem(item.path, registry)
    return "volume-" + hashlib.sha256("\0".join(map(str, payload)).encode()).hexdigest()[:16]


def score_row(row: dict[str, Any], index: int, detector: Detector, inline: bool = False) -> dict[str, Any]:
    """Read, score and (with ``out_dir``) write one row; the response row (:data:`.schema.RESPONSE_COLUMNS`).

    ``inline``: an HTTP request of base64 scans, answered with :data:`.schema.INLINE_COLUMNS` only.
    """
    t0 = time.perf_counter()
    item = read_row(row, index, detector)
    result = detector.score(item)
    volume = result.volume
    out_dir = text(row.get("out_dir"))
    if out_dir is not None:
        files = write_maps(result, out_dir, output_stem(row, item, detector.registry))
    else:  # no output location: the maps travel back in the response, base64 .nii.gz; the table as TSV text
        files = {
            "score_map": encode_nifti(result.score_map, volume.affine),
            "p_map": "" if inline or result.p_map is None else encode_nifti(result.p_map, volume.affine),
            "mask": "" if inline else encode_nifti(result.mask.astype("float32"), volume.affine),
            "lesion_table": "" if result.p_map is None else lesion_tsv(result.lesions),
        }
    cells = {
        **as_response(result_row(result, files)),
        "file": str(volume.path),
        "subject": item.subject if isinstance(item, Subject) else "",
        "session": (item.session or "") if isinstance(item, Subject) else "",
        "seconds": time.perf_counter() - t0,
        "error": "",
    }
    return {k: cells[k] for k in RESPONSE_COLUMNS}


def failed_row(row: dict[str, Any], index: int, reason: str) -> dict[str, Any]:
    """The response row of a row that could not be scored: its own error, no numbers and no decision
    (``is_anomalous`` null, never "normal"; the counts 0)."""
    name = text(row.get("path")) or text(row.get("subject")) or f"row {index}"
    return {
        **dict.fromkeys(RESPONSE_COLUMNS, math.nan),
        **dict.fromkeys(STRING_COLUMNS, ""),
        "file": name,
        "is_anomalous": None,
        "n_calibration": 0,  # long columns (MLflow's Spark UDF casts them): 0, not null
        "n_lesions": 0,
        "error": reason,
    }


def response(rows: list[dict[str, Any]], columns: tuple[str, ...] = RESPONSE_COLUMNS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))
