"""YAML for configs and model folders: safe tags only, aliases bounded, size bounded.

``yaml.safe_load`` never runs code, but anchors and aliases let a few hundred bytes stand for
gigabytes once the tree is walked (validation messages and config dumps do walk it: the "billion
laughs"). Anchors have honest uses (``<<: *defaults``, and ``yaml.safe_dump`` writes them for
repeated objects), so they are allowed while the document, with every alias expanded, holds at
most :data:`MAX_VALUES` values; that is counted on the parsed node graph before any Python object
is built. Text longer than :data:`MAX_CHARS` is refused too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_CHARS = 1 << 20  # 1 MiB: a config is a few kB; a model folder's config.yaml well under that
MAX_VALUES = 100_000  # values (scalars, lists, mappings) after expanding aliases; a config has hundreds


class AliasError(yaml.YAMLError):
    """A document whose aliases expand beyond :data:`MAX_VALUES` values, or refer to themselves."""


def expanded_size(node: yaml.Node, limit: int = MAX_VALUES) -> int:
    """How many values ``node`` stands for with every alias expanded; :class:`AliasError` past ``limit``."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise AliasError("a YAML alias refers to the node that contains it; write the value out in full")
        active.add(key)
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        active.discard(key)
        if total > limit:
            raise AliasError(
                f"YAML anchors and aliases expand to over {limit:,} values (an alias bomb?); refused before "
                "reading it (write the config out in full)"
            )
        sizes[key] = total
        return total

    return size(node)


def load(text: str | bytes, max_chars: int = MAX_CHARS) -> Any:
    """Parse ``text`` with safe tags only; :class:`yaml.YAMLError` for alias bombs, over-long text or bad YAML."""
    if len(text) > max_chars:
        raise yaml.YAMLError(f"{len(text):,} characters, above the limit of {max_chars:,} for a config")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_file(path: str | Path, max_chars: int = MAX_CHARS) -> Any:
    """:func:`load` on a file's text; its size is checked before it is read."""
    size = Path(path).stat().st_size
    if size > max_chars:
        raise yaml.YAMLError(f"{size:,} bytes, above the limit of {max_chars:,} for a config")
    return load(Path(path).read_text(), max_chars)
