"""The saved model is an MLflow pyfunc model, so ``mlflow models serve`` can score scans over HTTP.

Request rows: ``{"volume": "<base64 of a .nii or .nii.gz file>"}``. Response rows:
``volume_score``, ``is_anomalous``, ``threshold`` and ``score_map`` (base64 ``.nii.gz`` on the
input's grid). Payloads are read within the limits of :mod:`anomaly3d_core.io.limits`.

A model folder is written whole or not at all: into a temporary sibling, swapped in by rename,
under a lock that a concurrent second writer finds taken (:func:`~anomaly3d_core.io.files.replace_tree`).
"""

import base64
import binascii
import gzip
import importlib.metadata
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

# MLflow validates the input example by reloading the model; its download bar is noise here
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow.pyfunc  # noqa: E402
import nibabel as nib
import numpy as np
import pandas as pd

from anomaly3d_core.errors import DataError
from anomaly3d_core.io import limits
from anomaly3d_core.io.files import check_model_target, replace_tree
from anomaly3d_core.io.nifti import nifti_image
from anomaly3d_core.registry import get_registry

logging.getLogger("mlflow").setLevel(logging.WARNING)
PLUGINS_FILE = "plugins.json"


def encode_nifti(array: np.ndarray, affine: np.ndarray) -> str:
    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    return base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=4)).decode("ascii")


def decode_bytes(text: Any) -> bytes:
    """The file bytes of a base64 ``volume`` field, refused when larger than ``max_bytes`` could ever need."""
    if not isinstance(text, str) or not text:
        raise ValueError("'volume' must be a non-empty base64 string of a .nii or .nii.gz file")
    cap = limits.current().max_bytes
    if len(text) // 4 * 3 > cap + (1 << 20):  # a compressed file is never much larger than its content
        raise ValueError(
            f"'volume' holds about {len(text) // 4 * 3:,} bytes, above the limit of {cap:,} ({limits.ENV['max_bytes']})"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("'volume' is not valid base64") from None


def decode_nifti(text: str) -> nib.Nifti1Image:
    """Decode a base64 ``.nii``/``.nii.gz`` within the limits; raise ``ValueError`` with the reason on bad input."""
    raw = decode_bytes(text)
    try:
        return nifti_image(raw, "'volume'")
    except DataError as exc:
        raise ValueError(str(exc)) from None


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


def write_plugin_list(model: Any, folder: Path) -> None:
    """``plugins.json``: the package and version behind every plugin the model needs, so loading it
    where one is missing can say what to install."""
    reg = model.registry or get_registry()
    entries = []
    for family, name in model.plugin_specs():
        info = reg.info(family, name)
        entries.append({"family": family, "name": name, "package": info.package, "version": info.version})
    (folder / PLUGINS_FILE).write_text(json.dumps(entries, indent=2))


def save_pyfunc(pipeline: Any, path: str | Path) -> Path:
    """Write ``pipeline`` as an MLflow model folder at ``path``, replacing an older one only when the new one is complete."""
    out = check_model_target(path)

    def build(new: Path) -> None:
        with tempfile.TemporaryDirectory(dir=new.parent) as tmp:
            files = pipeline.save_files(Path(tmp) / "pipeline")
            write_plugin_list(pipeline, files)
            mlflow.pyfunc.save_model(
                str(new),
                python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                artifacts={"pipeline": str(files)},
                signature=signature(),
                input_example=input_example(pipeline),
                pip_requirements=_requirements(pipeline),
            )

    return replace_tree(out, build, "model folder")


def log_pyfunc(pipeline: Any, registered_model_name: str | None = None) -> Any:
    """Log ``pipeline`` to the active MLflow run (and optionally register it)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = pipeline.save_files(Path(tmp) / "pipeline")
        write_plugin_list(pipeline, files)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"pipeline": str(files)},
            signature=signature(),
            input_example=input_example(pipeline),
            pip_requirements=_requirements(pipeline),
            registered_model_name=registered_model_name,
        )
