"""On-disk cache of preprocessed volumes, keyed by file content and preprocessing config.

Repeated ``fit`` and ``tune`` runs over the same scans skip decoding and resampling. The cache
lives in ``$ANOMALY3D_CACHE_DIR`` (default ``~/.cache/anomaly3d/preprocessed``); set
``data.cache: false`` or ``ANOMALY3D_CACHE=0`` to turn it off. Entries are written atomically.

The key is a SHA-256 over length-prefixed fields (settings, then for every file its relative
name, size and bytes), so no two different inputs share a key. A hit is returned with the path
that asked for it. The cache holds at most ``ANOMALY3D_CACHE_MAX_MB`` megabytes (default 4096);
beyond that the least recently used entries are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.io.files import atomic_write
from anomaly3d_core.io.subjects import Subject, as_subject
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.preprocessing import Prepared, PreprocessRecord

VERSION = "5"  # 5: co-registration in the chain; 4: keyed by the chain; 3: multi-resolution registration
DEFAULT_MAX_MB = 4096


def cache_dir() -> Path | None:
    if os.environ.get("ANOMALY3D_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("ANOMALY3D_CACHE_DIR") or Path.home() / ".cache" / "anomaly3d" / "preprocessed"
    return Path(root)


def max_bytes() -> int:
    """The cache's size bound (``ANOMALY3D_CACHE_MAX_MB``, default 4096 MB)."""
    text = os.environ.get("ANOMALY3D_CACHE_MAX_MB", "").strip()
    try:
        mb = float(text) if text else DEFAULT_MAX_MB
    except ValueError:
        mb = DEFAULT_MAX_MB
    return int(max(mb, 0) * (1 << 20))


def _field(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def content_key(path: str | Path, settings: dict[str, Any]) -> str:
    """SHA-256 of the settings and of the content: a file's extension (it picks the loader), size and
    bytes; for a folder (DICOM) every file's relative name, size and bytes. A file's own name does
    not count, so a copy under another name is a hit."""
    h = hashlib.sha256()
    _field(h, VERSION.encode())
    _field(h, json.dumps(settings, sort_keys=True).encode())
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    _field(h, str(len(files)).encode())
    for f in files:
        _field(h, (f.relative_to(p).as_posix() if p.is_dir() else "".join(f.suffixes[-2:]).lower()).encode())
        h.update(f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def subject_key(files: list[str | Path], settings: dict[str, Any]) -> str:
    """The key of a subject's sequences read together: every file's :func:`content_key`, in order."""
    h = hashlib.sha256()
    for f in files:
        _field(h, content_key(f, settings).encode())
    return h.hexdigest()


def load(key: str, path: str | Path | None = None) -> Prepared | None:
    """The cached preprocessing for ``key``, as if read from ``path`` (the path that asks now)."""
    root = cache_dir()
    entry = None if root is None else root / f"{key}.npz"
    if entry is None or not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            where = str(path) if path is not None else meta["path"]
            source = Volume(z["source"], z["source_affine"], where, meta["source_meta"])
            prepared = Prepared(
                z["array"], z["mask"], z["affine"], PreprocessRecord.from_dict(meta["record"]), source
            )
    except Exception:  # a damaged entry is a cache miss, never an error
        return None
    with contextlib.suppress(OSError):
        os.utime(entry)  # most recently used
    return prepared


def _evict(root: Path) -> None:
    """Remove the least recently used entries until the cache fits :func:`max_bytes`."""
    entries = []
    for f in root.glob("*.npz"):
        with contextlib.suppress(OSError):
            st = f.stat()
            entries.append((st.st_mtime, st.st_size, f))
    total, bound = sum(e[1] for e in entries), max_bytes()
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= bound:
            break
        with contextlib.suppress(OSError):
            f.unlink()
            total -= size


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
        _evict(root)
    except OSError:
        pass  # a read-only or full disk only costs speed


def prepared(
    item: Any, prepare: Callable[[Any], Prepared], data: Any, channels: list[str], chain: list[dict[str, Any]]
) -> Prepared:
    """``prepare(item)``, through the cache when ``data.cache`` is on and the item's files exist
    (a file, or a subject's files); keyed by the files, the reading settings and the preprocessing
    ``chain`` (``Preprocessor.key()``: each step's name, version and parameters)."""
    files = (
        [as_subject(item).files.get(s) for s in channels] if isinstance(item, Subject | Mapping) else [item]
    )
    if not data.cache or not all(isinstance(f, str | Path) and Path(f).exists() for f in files):
        return prepare(item)
    settings = {
        "loader": data.loader,
        "loader_args": data.loader_args,
        "preprocessing": chain,
    }
    if isinstance(item, Subject | Mapping):
        settings |= {"sequences": channels}  # data.coregister is the chain's first step
        key = subject_key(files, settings)
    else:
        key = content_key(item, settings)
    found = load(key, files[0])
    if found is None:
        found = prepare(item)
        store(key, found)
    return found
