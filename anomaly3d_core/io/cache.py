"""On-disk cache of preprocessed volumes, keyed by file content and preprocessing config.

Repeated ``fit`` and ``tune`` runs over the same scans skip decoding and resampling. The cache
lives in ``$ANOMALY3D_CACHE_DIR`` (default ``~/.cache/anomaly3d/preprocessed``); set
``data.cache: false`` or ``ANOMALY3D_CACHE=0`` to turn it off. Entries are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.io.files import atomic_write
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.preprocessing import Prepared, PreprocessRecord

VERSION = "1"


def cache_dir() -> Path | None:
    if os.environ.get("ANOMALY3D_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("ANOMALY3D_CACHE_DIR") or Path.home() / ".cache" / "anomaly3d" / "preprocessed"
    return Path(root)


def content_key(path: str | Path, settings: dict[str, Any]) -> str:
    """SHA-256 of the file's bytes (every file, for a DICOM folder) and the settings."""
    h = hashlib.sha256(f"{VERSION}|{json.dumps(settings, sort_keys=True)}".encode())
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def load(key: str) -> Prepared | None:
    root = cache_dir()
    if root is None or not (root / f"{key}.npz").is_file():
        return None
    try:
        with np.load(root / f"{key}.npz", allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            source = Volume(z["source"], z["source_affine"], meta["path"], meta["source_meta"])
            return Prepared(
                z["array"], z["mask"], z["affine"], PreprocessRecord.from_dict(meta["record"]), source
            )
    except Exception:  # a damaged entry is a cache miss, never an error
        return None


def store(key: str, prepared: Prepared) -> None:
    root = cache_dir()
    if root is None:
        return
    meta = {
        "path": prepared.source.path,
        "record": prepared.record.to_dict(),
        "source_meta": {k: v for k, v in prepared.source.meta.items() if isinstance(v, str | int | float)},
    }

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                array=prepared.array,
                mask=prepared.mask,
                affine=prepared.affine,
                source=prepared.source.array,
                source_affine=prepared.source.affine,
                meta=np.array(json.dumps(meta)),
            )

    try:
        atomic_write(root / f"{key}.npz", write)
    except OSError:
        pass  # a read-only or full disk only costs speed
