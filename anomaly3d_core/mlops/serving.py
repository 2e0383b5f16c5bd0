"""The saved model is an MLflow pyfunc model, so ``mlflow models serve`` can score scans over HTTP.

Request rows: ``{"volume": "<base64 of a scan file>", "format": "<optional>"}``: NIfTI is
recognised by itself; any other one-file format a registered loader reads is named in ``format``
(a loader name such as ``itk`` or an extension such as ``nrrd``) or recognised by the loader's
``sniff``. Response rows: :data:`~anomaly3d_core.mlops.schema.INLINE_COLUMNS`, the score map
as base64 ``.nii.gz`` on the input's grid, whatever the input format. Payloads are read within the
limits of :mod:`anomaly3d_core.io.limits`.

A model folder is written whole or not at all: into a temporary sibling, swapped in by rename,
under a lock that a concurrent second writer finds taken (:func:`~anomaly3d_core.io.files.replace_tree`).
"""

import base64
import binascii
import gzip
import importlib.metadata
import logging
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

# MLflow validates the input example by reloading the model; its download bar is noise here
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow.pyfunc  # noqa: E402
import nibabel as nib
import numpy as np
import pandas as pd

from anomaly3d_core.errors import DataError, PluginError
from anomaly3d_core.io import limits
from anomaly3d_core.io.files import check_model_target, replace_tree
from anomaly3d_core.io.nifti import nifti_image, read_nifti
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.mlops.schema import signature
from anomaly3d_core.provenance import plugin_provenance, write_model_files, write_plugin_list
from anomaly3d_core.registry import get_registry

logging.getLogger("mlflow").setLevel(logging.WARNING)


def encode_nifti(array: np.ndarray, affine: np.ndarray) -> str:
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=4)).decode("ascii")


def decode_bytes(text: Any, label: str = "'volume'") -> bytes:
    """The file bytes of a base64 field (``label`` names it), refused when larger than ``max_bytes`` could ever need."""
    if not isinstance(text, str) or not text:
        raise ValueError(
            f"{label} must be a non-empty base64 string of a scan file (.nii, .nii.gz or another format)"
        )
    cap = limits.current().max_bytes
    if len(text) // 4 * 3 > cap + (1 << 20):  # a compressed file is never much larger than its content
        raise ValueError(
            f"{label} holds about {len(text) // 4 * 3:,} bytes, above the limit of {cap:,} ({limits.ENV['max_bytes']})"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{label} is not valid base64") from None


def decode_nifti(text: str) -> nib.Nifti1Image:
    """Decode a base64 ``.nii``/``.nii.gz`` within the limits; raise ``ValueError`` with the reason on bad input."""
    raw = decode_bytes(text)
    try:
        return nifti_image(raw, "'volume'")
    except DataError as exc:
        raise ValueError(str(exc)) from None


def _looks_like_nifti(raw: bytes) -> bool:
    """Whether the bytes (gzipped or not) start with a NIfTI-1/2 (or ANALYZE) header size."""
    head = raw[:8]
    if raw[:2] == b"\x1f\x8b":
        try:  # only the first bytes are inflated
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw[:4096], 8)
        except zlib.error:
            return False
    return len(head) >= 4 and (
        int.from_bytes(head[:4], "little") in (348, 540) or int.from_bytes(head[:4], "big") in (348, 540)
    )


def _formats(reg: Any) -> str:
    return ", ".join(
        f"{i.name} ({' '.join(i.cls.extensions)})" if i.cls.extensions else i.name
        for i in reg.infos("loaders")
        if not i.cls.reads_directories
    )


def loader_for_format(fmt: str, reg: Any) -> tuple[Any, list[str]]:
    """The loader class a request's ``format`` names (a loader name, ``package:name`` or an extension)
    and the file suffixes to try."""
    try:
        cls = reg.get("loaders", fmt)
        return cls, list(cls.extensions) or [""]
    except PluginError as exc:
        if fmt in reg.clashes("loaders"):
            raise DataError(None, f"format: {exc}") from None
    ext = "." + fmt.lower().lstrip(".")
    for info in reg.infos("loaders"):
        if ext in (e.lower() for e in info.cls.extensions):
            return info.cls, [ext]
    raise DataError(None, f"unknown format '{fmt}'; use a loader name or extension: {_formats(reg)}")


def read_payload(raw: bytes, fmt: Any = None, registry: Any = None, label: str = "'volume'") -> Volume:
    """A request row's scan, read within the limits: NIfTI in memory; another format through the
    loader plugin that ``fmt`` names (a loader name or an extension) or, without ``fmt``, the one
    whose ``sniff`` recognises the content. The loader reads a private temporary copy."""
    reg = registry or get_registry()
    fmt = fmt.strip() if isinstance(fmt, str) and fmt.strip() else None  # pandas gives NaN for no format
    cls, suffixes = loader_for_format(fmt, reg) if fmt else (None, [])
    if cls is not None and cls.reads_directories:
        raise DataError(
            None,
            f"format '{fmt}' reads a folder of files (a series); the server takes one file per row: "
            f"send it in a one-file format ({_formats(reg)})",
        )
    if cls is None and not _looks_like_nifti(raw):
        cls, suffixes = _sniff(raw, reg)
    if cls is None or (cls.name == "nifti" and ".nii.gz" in cls.extensions):
        try:
            data, affine = read_nifti(raw, label)
        except DataError as exc:
            if fmt:
                raise
            raise DataError(
                None, f"{exc.reason}; for another format name it in the row's 'format' field: {_formats(reg)}"
            ) from None
        return Volume(data, affine, label)
    with tempfile.TemporaryDirectory(prefix="anomaly3d-serve-") as tmp:
        first: DataError | None = None
        for suffix in suffixes:
            path = Path(tmp) / f"volume{suffix}"
            path.write_bytes(raw)
            try:
                with limits.untrusted_input():  # a payload's header may not send the reader elsewhere
                    volume = cls().load(path)
                break
            except DataError as exc:
                first = first or DataError(None, exc.reason)
            except Exception as exc:  # a loader's library error, never raw to the client
                text = " ".join(str(exc).split())
                first = first or DataError(
                    None, f"cannot be read as {cls.name} ({type(exc).__name__}: {text})"
                )
            finally:
                path.unlink(missing_ok=True)
        else:
            raise first or DataError(None, f"cannot be read as {cls.name}")
    volume.path = label
    return volume


def _sniff(raw: bytes, reg: Any) -> tuple[Any, list[str]]:
    """The first one-file loader whose ``sniff`` recognises the bytes (written to a private file)."""
    with tempfile.TemporaryDirectory(prefix="anomaly3d-sniff-") as tmp:
        path = Path(tmp) / "volume"
        path.write_bytes(raw)
        for info in reg.infos("loaders"):
            if info.cls.reads_directories:
                continue
            try:
                if info.cls.sniff(path):
                    return info.cls, list(info.cls.extensions) or [""]
            except Exception:  # a plugin's sniff that fails means "not mine"
                continue
    return None, []


def _requirements(model: Any) -> list[str]:
    """The project itself plus every third-party package whose plugins this model uses, loaders included."""
    reqs = {f"anomaly3d=={importlib.metadata.version('anomaly3d')}"}
    for entry in plugin_provenance(model):
        if entry["package"] != "anomaly3d" and entry["version"] != "?":
            reqs.add(f"{entry['package']}=={entry['version']}")
    return sorted(reqs)


def input_example(model: Any) -> pd.DataFrame:
    """The model's input example: one of its own held-out normal scans when it still has them
    (so the example is valid for models that need a particular grid), else a small synthetic scan."""
    example = model.reference().example_volume()
    channels = model.channels
    if len(channels) > 1:  # one column per sequence, named by it
        if example is None or example.channels != len(channels):
            return pd.DataFrame({seq: [example_volume_b64()] for seq in channels})
        return pd.DataFrame(
            {seq: [encode_nifti(example.channel(c), example.affine)] for c, seq in enumerate(channels)}
        )
    text = encode_nifti(example.array, example.affine) if example is not None else example_volume_b64()
    return pd.DataFrame({"volume": [text]})


def example_volume_b64(shape: tuple[int, int, int] = (24, 24, 24)) -> str:
    """A small synthetic scan, base64 ``.nii.gz``."""
    rng = np.random.default_rng(0)
    arr = np.zeros(shape, dtype=np.float32)
    arr[4:-4, 4:-4, 4:-4] = 1.0 + 0.1 * rng.standard_normal(tuple(s - 8 for s in shape))
    return encode_nifti(arr, np.diag([2.0, 2.0, 2.0, 1.0]))


def save_pyfunc(pipeline: Any, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``pipeline`` as an MLflow model folder at ``path``: its plain folder
    (:func:`~anomaly3d_core.provenance.write_model_files`) wrapped as a pyfunc model, replacing an
    older one only when the new one is complete. ``metadata`` goes into the ``MLmodel`` file (e.g.
    the run that logged it). The engine's model writer for the command line."""
    out = check_model_target(path)

    def build(new: Path) -> None:
        with tempfile.TemporaryDirectory(dir=new.parent) as tmp:
            files = write_model_files(pipeline, Path(tmp) / "pipeline")
            mlflow.pyfunc.save_model(
                str(new),
                python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                artifacts={"pipeline": str(files)},
                signature=signature(pipeline.channels),
                input_example=input_example(pipeline),
                pip_requirements=_requirements(pipeline),
                metadata=metadata,
            )

    return replace_tree(out, build, "model folder")


def log_pyfunc(
    pipeline: Any,
    registered_model_name: str | None = None,
    name: str = "model",
    tags: dict[str, str] | None = None,
    model_type: str | None = None,
    step: int = 0,
) -> Any:
    """Log ``pipeline`` to the active MLflow run (and optionally register it); ``tags`` and
    ``model_type`` go on the logged model, so ``search_logged_models`` can filter on them; the run's
    metrics at ``step`` (the last epoch) are linked to it."""
    with tempfile.TemporaryDirectory() as tmp:
        files = pipeline.save_files(Path(tmp) / "pipeline")
        write_plugin_list(pipeline, files)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"pipeline": str(files)},
            signature=signature(pipeline.channels),
            input_example=input_example(pipeline),
            pip_requirements=_requirements(pipeline),
            registered_model_name=registered_model_name,
            tags=tags,
            model_type=model_type,
            step=step,
        )
