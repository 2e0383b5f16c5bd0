"""What the command line's sub-commands share: reading the config, the model and the inputs, the
engine they run, and how they report failed inputs.

Each helper imports what it needs when it runs, so ``--help`` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the exit codes of every command (see anomaly3d_core.cli)
EXIT_OK, EXIT_INPUTS_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def read_config(args: argparse.Namespace) -> Any:
    """Every command reads its config through this one validated path."""
    from anomaly3d_core.persistence import load_any_config

    return load_any_config(getattr(args, "config", None), args.overrides)


def check_out(path: str) -> Path:
    from anomaly3d_core.io.files import check_output_dir

    return check_output_dir(path)


def load_model(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[Any, Path]:
    """The saved detector (a folder, or a ``models:/``/``runs:/`` URI fetched for the command's
    duration), with any ``--set data.loader...`` reading options applied, and its folder."""
    from anomaly3d_core.mlops.models import fetch_model, is_model_uri
    from anomaly3d_core.persistence import load_detector

    folder = fetch_model(args.model, stack) if is_model_uri(args.model) else Path(args.model)
    pipe = load_detector(folder)
    # tracking.* is the run's (the model folder's own is ignored); the rest changes how scans are read
    run_sets = [o for o in args.overrides if o.strip().startswith("tracking.")]
    if run_sets:
        from anomaly3d_core.config import build_config

        pipe.config.tracking = build_config({}, run_sets).tracking
    reading = [o for o in args.overrides if o not in run_sets]
    if reading:
        pipe.set_reading(reading)
    return pipe, folder


def warn_uncalibrated(detector: Any) -> None:
    """One line on stderr when the model's scan decisions are uncalibrated (too few calibration normals
    for alpha; a model saved before calibration nulls has warned on loading)."""
    post = detector.postprocessor_
    if post.n_calibration and not post.decisions_calibrated:
        print(
            f"warning: decisions are uncalibrated ({post.decision_rule}, no stated error rate): the model "
            f"was calibrated on {post.n_calibration} normal scan(s), too few for alpha {post.config.alpha:g}; "
            "see decision_rule in scores.csv",
            file=sys.stderr,
        )


def cli_engine(config: Any, args: argparse.Namespace) -> Any:
    """The engine as the command line runs it: MLflow tracking as the config says (runs named with
    the ``--set`` overrides), MLflow model folders."""
    from anomaly3d_core.mlops.tracker import engine_for

    return engine_for(config, args.overrides)


def registration(args: argparse.Namespace, config: Any, default: str | None = None) -> tuple[str, str] | None:
    """``(name, alias)`` from ``--register``, else ``tracking.register_as``, else ``default``."""
    from anomaly3d_core.mlops.models import parse_register

    if not config.tracking.enabled:
        return None
    return parse_register(getattr(args, "register", None) or config.tracking.register_as or default)


def inputs(spec: str, config_or_model: Any) -> Any:
    """Files, or subjects when the config names several sequences (``data.sequences``)."""
    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.persistence import reference_config

    return list_items(spec, reference_config(config_or_model).data.channels)


def report(failures: Any, what: str, refused: Sequence[Any] = ()) -> int:
    for error in refused:  # subjects refused while grouping their files
        failures.add(error)
    if failures:
        print(f"\n{len(failures)} input(s) failed during {what}:\n{failures.report()}", file=sys.stderr)
        return EXIT_INPUTS_FAILED
    return EXIT_OK


def data_name(spec: str | Path) -> str:
    """The readable name of the scan set a ``--train``/``--input`` argument names."""
    from anomaly3d_core.mlops.naming import data_folder, set_name

    return set_name(data_folder(spec))


def config_name(config_path: str | None) -> str:
    from anomaly3d_core.mlops.tracking import config_label

    return config_label(config_path)


def print_registered(register: tuple[str, str] | None) -> None:
    if register:
        print(
            f"registered as models:/{register[0]}@{register[1]} (serve: make serve MODEL=models:/{register[0]}@{register[1]})"
        )


def print_advice(config: Any, scans: list[Any]) -> None:
    """Tell the user what the scans are (one template grid or their own space) and which preset suits them."""
    from anomaly3d_core.io.subjects import Subject
    from anomaly3d_core.persistence import reference_config
    from anomaly3d_core.preprocess.registration import mni152_reference
    from anomaly3d_core.preprocess.survey import survey

    first = reference_config(config)
    channels = first.data.channels
    files = [Path(s.files[channels[0]]) if isinstance(s, Subject) else s for s in scans]  # reference sequence
    found = survey(files, mni152_reference())
    print(
        "data"
        + (f" ({channels[0]} scans of {len(scans)} subjects)" if channels else "")
        + ": "
        + found.advice(first.threshold.normative, first.data.preprocessing.register_to, channels or ()),
        flush=True,
    )
