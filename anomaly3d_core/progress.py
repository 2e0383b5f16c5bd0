"""Progress bars with an ETA on a terminal, silence otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar on stderr when it is a terminal (or ``enabled=True``)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(
        iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs
    )
