"""The saved model is an MLflow pyfunc model, so ``mlflow models serve`` can score scans over HTTP.

Request rows: ``{"volume": "<base64 of a .nii or .nii.gz file>"}``. Response rows:
``volume_score``, ``is_anomalous``, ``threshold`` and ``score_map`` (base64 ``.nii.gz`` on the
input's grid).
"""

import base64
import binascii
import gzip
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# MLflow validates the input example by reloading the model; its download bar is noise here
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow.pyfunc  # noqa: E402
import nibabel as nib
import numpy as np
import pandas as pd

from anomaly3d_core.errors import Anomaly3DError
from anomaly3d_core.registry import get_registry

logging.getLogger("mlflow").setLevel(logging.WARNING)


def encode_nifti(array: np.ndarray, affine: np.ndarray) -> str:
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=4)).decode("ascii")


def decode_nifti(text: str) -> nib.Nifti1Image:
    """Decode a base64 ``.nii``/``.nii.gz``; raise ``ValueError`` with the reason on bad input."""
    if not isinstance(text, str) or not text:
        raise ValueError("'volume' must be a non-empty base64 string of a .nii or .nii.gz file")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("'volume' is not valid base64") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise ValueError("'volume' is a truncated or corrupt gzip stream") from None
    try:
        return nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:
        raise ValueError(f"'volume' is not a NIfTI-1 file ({exc})") from None


def _requirements(model: Any) -> list[str]:
    """The project itself plus every third-party package whose plugins this model uses."""
    reg = model.registry or get_registry()
    reqs = {f"anomaly3d=={importlib.metadata.version('anomaly3d')}"}
    for family, name in model.plugin_specs():
        info = reg.info(family, name)
        if info.package != "anomaly3d":
            reqs.add(f"{info.package}=={info.version}")
    return sorted(reqs)


def input_example(model: Any) -> pd.DataFrame:
    """The model's input example: one of its own held-out normal scans when it still has them
    (so the example is valid for models that need a particular grid), else a small synthetic scan."""
    holder = model.members[0] if hasattr(model, "members") else model
    example = holder.example_volume()
    text = encode_nifti(example.array, example.affine) if example is not None else example_volume_b64()
    return pd.DataFrame({"volume": [text]})


def example_volume_b64(shape: tuple[int, int, int] = (24, 24, 24)) -> str:
    """A small synthetic scan, base64 ``.nii.gz``."""
    rng = np.random.default_rng(0)
    arr = np.zeros(shape, dtype=np.float32)
    arr[4:-4, 4:-4, 4:-4] = 1.0 + 0.1 * rng.standard_normal(tuple(s - 8 for s in shape))
    return encode_nifti(arr, np.diag([2.0, 2.0, 2.0, 1.0]))


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "volume")]),
        outputs=Schema(
            [
                ColSpec("double", "volume_score"),
                ColSpec("boolean", "is_anomalous"),
                ColSpec("double", "threshold"),
                ColSpec("string", "score_map"),
            ]
        ),
    )


def save_pyfunc(pipeline: Any, path: str | Path) -> Path:
    """Write ``pipeline`` as an MLflow model folder at ``path`` (replacing an older one)."""
    out = Path(path)
    if out.exists():
        if not (out / "MLmodel").is_file() and any(out.iterdir()):
            raise Anomaly3DError(
                f"{out}: exists and is not an anomaly3d model folder; choose an empty or new path"
            )
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        files = pipeline.save_files(Path(tmp) / "pipeline")
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"pipeline": str(files)},
            signature=signature(),
            input_example=input_example(pipeline),
            pip_requirements=_requirements(pipeline),
        )
    return out


def log_pyfunc(pipeline: Any, registered_model_name: str | None = None) -> Any:
    """Log ``pipeline`` to the active MLflow run (and optionally register it)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = pipeline.save_files(Path(tmp) / "pipeline")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"pipeline": str(files)},
            signature=signature(),
            input_example=input_example(pipeline),
            pip_requirements=_requirements(pipeline),
            registered_model_name=registered_model_name,
        )
