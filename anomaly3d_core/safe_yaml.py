"""YAML for configs and model folders: safe tags only, no aliases, bounded size.

``yaml.safe_load`` never runs code, but anchors and aliases still let a few hundred bytes expand
into gigabytes once the tree is walked (validation messages and config dumps do walk it). A
config never needs them, so the loader refuses any alias before the tree is built, and refuses
text longer than :data:`MAX_CHARS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_CHARS = 1 << 20  # 1 MiB: a config is a few kB; a model folder's config.yaml well under that


class AliasError(yaml.YAMLError):
    """A YAML alias (``*name``) where anomaly3d refuses them."""


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasError(
                f"YAML alias '*{event.anchor}' at line {event.start_mark.line + 1}: anchors and aliases are "
                "not allowed in anomaly3d configs (write the value out in full)"
            )
        return super().compose_node(parent, index)


def load(text: str | bytes, max_chars: int = MAX_CHARS) -> Any:
    """Parse ``text`` with safe tags only; :class:`yaml.YAMLError` for aliases, over-long text or bad YAML."""
    if len(text) > max_chars:
        raise yaml.YAMLError(f"{len(text):,} characters, above the limit of {max_chars:,} for a config")
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_file(path: str | Path, max_chars: int = MAX_CHARS) -> Any:
    """:func:`load` on a file's text; its size is checked before it is read."""
    size = Path(path).stat().st_size
    if size > max_chars:
        raise yaml.YAMLError(f"{size:,} bytes, above the limit of {max_chars:,} for a config")
    return load(Path(path).read_text(), max_chars)
