"""What a saved model folder says about itself: the packages behind its plugins (``plugins.json``)
and the run that recorded it (``metadata.json`` of a plain folder, ``MLmodel`` of an MLflow one).

Read with ``yaml.safe_load``/``json`` only; nothing from a model folder is ever executed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from anomaly3d_core import safe_yaml
from anomaly3d_core.registry import get_registry

PLUGINS_FILE = "plugins.json"
METADATA_FILE = "metadata.json"  # a plain folder's metadata (an MLflow folder keeps it in MLmodel)
LINEAGE_KEY = "anomaly3d"  # the metadata entry that says which run recorded a saved model


def plugin_provenance(model: Any) -> list[dict[str, Any]]:
    """The package and version behind every plugin the model needs: those its config names
    (``required``) and the loaders that read its training scans (loaders carry their extensions)."""
    reg = model.registry or get_registry()
    required = set(model.config.plugin_specs())
    entries = []
    for family, name in model.plugin_specs():
        info = reg.info(family, name)
        entry = {
            "family": family,
            "name": name,
            "package": info.package,
            "version": info.version,
            "required": (family, name) in required,
        }
        if family == "loaders":
            entry["extensions"] = list(info.cls.extensions)
        entries.append(entry)
    return entries


def write_plugin_list(model: Any, folder: Path) -> None:
    """``plugins.json``: the package and version behind every plugin the model needs, so loading it
    where one is missing can say what to install."""
    (folder / PLUGINS_FILE).write_text(json.dumps(plugin_provenance(model), indent=2))


def write_model_files(model: Any, folder: Path, metadata: dict[str, Any] | None = None) -> Path:
    """A plain model folder: the detector's files, ``plugins.json`` and, given, ``metadata.json``."""
    files = model.save_files(folder)
    write_plugin_list(model, files)
    if metadata:
        (files / METADATA_FILE).write_text(json.dumps(metadata, indent=1, default=str))
    return files


def read_lineage(model_folder: str | Path) -> dict[str, str]:
    """The run and logged model behind a model folder: from the ``MLmodel`` of a model downloaded
    from MLflow (``run_id``, ``model_id``), of a folder written by ``fit --out`` (its metadata), or
    a plain folder's ``metadata.json``; ``{}`` when it says nothing."""
    folder = Path(model_folder)
    meta: Any = {}
    try:
        if (folder / "MLmodel").is_file():
            meta = safe_yaml.load_file(folder / "MLmodel") or {}
        elif (folder / METADATA_FILE).is_file():
            meta = {"metadata": json.loads((folder / METADATA_FILE).read_text())}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    if not isinstance(meta, dict) or not isinstance(meta.get("metadata") or {}, dict):
        return {}
    found = (meta.get("metadata") or {}).get(LINEAGE_KEY) or {}
    out = dict(found) if isinstance(found, dict) else {}
    for key in ("run_id", "model_id"):
        if meta.get(key):
            out[key] = str(meta[key])
    if out.get("model_id"):
        out.setdefault("model_uri", f"models:/{out['model_id']}")
    return {k: str(v) for k, v in out.items()}
