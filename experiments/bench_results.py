"""Benchmark result files: a partial rerun (``--only``) updates its rows and keeps the others;
``--validation-only`` recomputes the validation column of rows already in the file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def merge_rows(previous: Path, fresh: list[dict[str, Any]], order: Iterable[str]) -> list[dict[str, Any]]:
    """The rows of ``previous`` (a results JSON) with ``fresh`` rows replacing those of the same
    ``name`` and new ones added, sorted by ``order`` (names not in it last)."""
    if not previous.is_file():
        return fresh
    by_name = {r["name"]: r for r in fresh}
    rows = [by_name.pop(r["name"], r) for r in json.loads(previous.read_text())] + list(by_name.values())
    order = list(order)
    return sorted(rows, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))


def previous_row(previous: Path, name: str, missing_ok: bool = False) -> dict[str, Any] | None:
    """The row called ``name`` in the results JSON ``previous`` (a copy); ``None`` or an error when absent."""
    rows = json.loads(previous.read_text()) if previous.is_file() else []
    for row in rows:
        if row["name"] == name:
            return dict(row)
    if missing_ok:
        return None
    raise SystemExit(
        f"{previous}: no row '{name}' to keep the test figures of; run it without --validation-only first"
    )


def add_validation_only(parser: argparse.ArgumentParser) -> None:
    """The ``--validation-only`` option every benchmark script shares."""
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="recompute only the validation column of the rows (test figures kept from --out's results)",
    )


def rows_to_validate(args: argparse.Namespace, previous: Path, names: list[str]) -> list[str]:
    """``names`` as they are, or with ``--validation-only`` those the results file has (and no
    MLflow logging: there are no new test figures to log)."""
    if not args.validation_only:
        return names
    args.no_mlflow = True
    return [n for n in names if previous_row(previous, n, missing_ok=True)]
