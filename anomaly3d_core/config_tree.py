"""Nested config trees as plain data: dotted keys, ``--set`` values, one-line validation messages,
merging, and the seed API's per-component dicts as config sections.

Nothing here knows the config's sections (:mod:`anomaly3d_core.config` does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from anomaly3d_core import safe_yaml
from anomaly3d_core.errors import did_you_mean


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested mappings; lists of mappings get their index (``members.0.training``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


def _fields_at(model: type[BaseModel], loc: Iterable[Any]) -> list[str]:
    """Valid field names of the (sub)model that ``loc`` points into."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = fields[part].annotation
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem: ``dotted.key: reason``, with a suggestion for unknown keys."""
    lines = []
    for e in err.errors():
        loc = (
            [p for p in e["loc"] if not isinstance(p, int)]
            if e["type"] == "extra_forbidden"
            else list(e["loc"])
        )
        path = prefix + ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            key, parent = str(loc[-1]), loc[:-1]
            msg = did_you_mean(key, _fields_at(model, parent), what="key")
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"{path}: {msg}")
    return "; ".join(lines)


def name_sources(message: str, path: Any, overrides: Iterable[str]) -> str:
    """``message`` (``key: reason; key: reason``) with each problem named by where it came from: the
    ``--set key=value`` that set its key (or a section above it), else the config file ``path``."""
    sets = {item.split("=", 1)[0].strip(): item.strip() for item in overrides if "=" in item}
    parts = []
    for part in re.split(r"; (?=[\w.\[\]-]+: )", message):  # one problem each (format_validation_error)
        key = part.partition(": ")[0]
        given = next((sets[k] for k in sets if key == k or key.startswith(k + ".")), None)
        if given is not None:
            parts.append(f"--set {given}: {part}")
        else:
            parts.append(f"{path}: {part}" if path and not part.startswith("--set ") else part)
    return "; ".join(parts)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, booleans, lists)."""
    try:
        return safe_yaml.load(text)
    except yaml.YAMLError:
        return text


def seed_component_sections(
    feature_extractor_config: Mapping | None,
    embedding_config: Mapping | None,
    autoencoder_config: Mapping | None,
    patch_config: Mapping | None,
    training_config: Mapping | None,
    threshold_config: Mapping | None,
    preprocessing_config: Mapping | None,
) -> dict[str, Any]:
    """Config sections from the seed README's per-component dicts (``feature_extractor_config=...``)."""
    tree: dict[str, Any] = {}
    if feature_extractor_config:
        fx = dict(feature_extractor_config)
        tree["extractor"] = {"type": fx.pop("type", "simple"), "args": fx.pop("args", {}), **fx}
    if embedding_config:
        tree["embedding"] = dict(embedding_config)
    if autoencoder_config:
        ae = dict(autoencoder_config)
        tree["autoencoder"] = {"type": ae.pop("type", "standard"), "args": ae.pop("args", {}), **ae}
    if patch_config:
        tree["patches"] = dict(patch_config)
    if training_config:
        tree["training"] = dict(training_config)
    if threshold_config:
        th = dict(threshold_config)
        tree["threshold"] = {
            "type": th.pop("type", th.pop("method", "percentile")),
            "args": th.pop("args", {}),
            **th,
        }
    if preprocessing_config:
        tree["data"] = {"preprocessing": dict(preprocessing_config)}
    return tree


def merge_trees(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base`` recursively (a plugin's ``args`` are replaced whole)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge_trees(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "args"
            else value
        )
    return out
