"""Each benchmark table row as an MLflow run, comparable with ``fit``/``evaluate`` runs: the same
metric names, tags, and the training and test scan sets as dataset inputs.

Runs go to the experiment ``--experiment`` (default ``anomaly3d-benchmark``) in the tracking store
``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``; ``--no-mlflow`` skips them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXPERIMENT = "anomaly3d-benchmark"
# the native and multi-sequence benchmarks' names for the same figure
RENAMED = {"seconds_per_scan": "seconds_per_volume", "seconds_per_subject": "seconds_per_volume"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the rows as MLflow runs")


def row_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A result's figures under the names ``evaluate`` uses; the held-out kinds' with ``held_out_``."""
    out = {
        RENAMED.get(k, k): v
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    out.update(result["all"])
    out.update({f"held_out_{k}": v for k, v in result.get("held_out_kinds", {}).items()})
    return out


def scan_sets(data: Path, channels: tuple[str, ...] = ()) -> list[tuple[Any, str]]:
    """The benchmark's training and test sets: files, or subjects with ``channels``."""
    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.mlops.datasets import ScanSet
    from anomaly3d_core.mlops.naming import set_name

    train, test = (list_items(data / split, list(channels)).items for split in ("train", "test"))
    return [
        (ScanSet(train, name=set_name(data / "train")), "training"),
        (ScanSet(test, name=set_name(data / "test"), masks=data / "test_masks"), "evaluation"),
    ]


def log_rows(
    results: list[dict[str, Any]], configs: dict[str, Any], data: Path, experiment: str, table: str
) -> list[str]:
    """Log each row (``configs[name]``: its config, or ``None`` for a baseline) as a run, with the
    scan sets it read (hashed once per set of sequences)."""
    from anomaly3d_core.mlops.tracking import log_result_run

    cache: dict[tuple[str, ...], list[tuple[Any, str]]] = {}
    ids = []
    for result in results:
        config, config_name = configs.get(result["name"], (None, "baseline"))
        channels = tuple(config.data.channels) if config is not None and hasattr(config, "data") else ()
        if channels not in cache:
            cache[channels] = scan_sets(data, channels)
        sets = cache[channels]
        ids.append(
            log_result_run(
                f"benchmark {result['name']}",
                row_metrics(result),
                experiment=experiment,
                config=config,
                config_name=config_name,
                datasets=sets,
                tags={"anomaly3d.benchmark": table, "anomaly3d.benchmark.row": result["name"]},
            )
        )
    return ids
