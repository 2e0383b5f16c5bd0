"""Progress of long steps (data generation, fitting, batch scoring): a tqdm bar with an ETA on a
terminal, plain lines in a log otherwise (``scoring: 3/10, 12 s, about 28 s left``), on stderr so
that stdout keeps the results."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LINE_EVERY_S = 30.0  # a plain line at least this often on a slow step ...
TENTHS = 10  # ... and at every further tenth of the work


class PlainProgress:
    """Iterates like a tqdm bar, writing a line at every tenth of the work (or every
    :data:`LINE_EVERY_S` seconds) and at the end; ``set_postfix`` values join the line."""

    def __init__(
        self, iterable: Iterable[T], desc: str, total: int | None, stream: TextIO | None = None
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else _length(iterable)
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.n = 0
        self._start = time.perf_counter()
        self._last_line = self._start
        self._last_tenth = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.n += 1
            self._maybe_line()

    def _maybe_line(self) -> None:
        now = time.perf_counter()
        tenth = self.n * TENTHS // self.total if self.total else 0
        done = bool(self.total) and self.n >= self.total
        if done or tenth > self._last_tenth or now - self._last_line >= LINE_EVERY_S:
            self._last_line, self._last_tenth = now, tenth
            print(self.line(now - self._start), file=self.stream, flush=True)

    def line(self, elapsed: float) -> str:
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        text = f"{self.desc}: {count}, {elapsed:.0f} s"
        if self.total and 0 < self.n < self.total:
            text += f", about {elapsed / self.n * (self.total - self.n):.0f} s left"
        extra = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return f"{text} ({extra})" if extra else text

    def set_postfix(self, values: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.postfix = {**(values or {}), **kwargs}

    def close(self) -> None:
        """Nothing to clear (the lines stay in the log)."""


def _length(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar on stderr when it is a terminal (or ``enabled=True``), plain lines when it is not
    (``enabled=None``), nothing with ``enabled=False``."""
    if enabled is None and not sys.stderr.isatty():
        return PlainProgress(iterable if iterable is not None else range(total or 0), desc, total)
    return tqdm(
        iterable, desc=desc, total=total, disable=enabled is False, dynamic_ncols=True, leave=False, **kwargs
    )
