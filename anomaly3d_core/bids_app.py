"""``anomaly3d bids BIDS_DIR OUTPUT_DIR participant|group``: the BIDS Apps interface.

- ``participant`` scores the chosen subjects (``--participant-label``, ``--session-label``; all by
  default) of the raw dataset ``BIDS_DIR`` with ``--model`` and writes a BIDS-Derivatives dataset
  into ``OUTPUT_DIR`` (:mod:`anomaly3d_core.io.derivatives`) with a report per subject;
- ``group`` writes the group report ``OUTPUT_DIR/report.html`` over every subject scored there, or,
  with ``--fit``, trains a model on the chosen subjects (normal scans) and writes it to ``--model``,
  calibrated on ``--calibration`` (held-out normal subjects) when given.

Labels are given without their ``sub-``/``ses-`` prefix (``01``), as BIDS Apps take them; the
prefixed form is accepted too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from anomaly3d_core.errors import ConfigError, DataError

DESCRIPTION = """BIDS App (bids_dir output_dir participant|group):
  participant  score the chosen subjects with --model; output_dir becomes a BIDS-Derivatives
               dataset with score maps, masks, sidecars, scores.tsv and a report per subject
  group        write output_dir/report.html over every subject scored there, or, with --fit,
               train a model on the chosen (normal) subjects and write it to --model
Labels without their sub-/ses- prefix (01), as BIDS Apps take them; the prefixed form works too."""


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the ``bids`` subcommand on the CLI's subparsers."""
    p = sub.add_parser(
        "bids",
        help="BIDS App: bids BIDS_DIR OUTPUT_DIR participant|group (score subjects / group report or fit)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bids_dir", help="the raw BIDS dataset")
    p.add_argument(
        "output_dir", help="the derivatives dataset to write (e.g. BIDS_DIR/derivatives/anomaly3d)"
    )
    p.add_argument("analysis_level", choices=("participant", "group"))
    p.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="subjects to process (default: all)",
    )
    p.add_argument(
        "--session-label",
        "--session_label",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="sessions (default: all)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder (or models:/NAME@ALIAS); with group --fit, the folder to write",
    )
    p.add_argument("--fit", action="store_true", help="group level: train a model on the chosen subjects")
    p.add_argument("--config", help="pipeline YAML for --fit (must name data.sequences)")
    p.add_argument(
        "--calibration",
        help="with --fit: held-out normal subjects used only to calibrate the p-values (a BIDS dataset, a "
        "manifest or a folder of <subject>_<sequence> files, as for fit --calibration); at least "
        "ceil(1/alpha)-1 of them (19 for alpha 0.05)",
    )
    common(p)


def _labels(values: Sequence[str], prefix: str) -> set[str]:
    return {v.removeprefix(prefix) for v in values}


def select(subjects: Sequence[Any], participants: Sequence[str], sessions: Sequence[str]) -> list[Any]:
    """The subjects whose label (and session) was asked for; every one when none was."""
    wanted, wanted_sessions = _labels(participants, "sub-"), _labels(sessions, "ses-")
    chosen = [
        s
        for s in subjects
        if (not wanted or s.subject in wanted)
        and (not wanted_sessions or (s.session or "") in wanted_sessions)
    ]
    missing = wanted - {s.subject for s in subjects}
    if missing:
        raise DataError(
            None, f"--participant-label {' '.join(sorted(missing))}: no such subject in the dataset"
        )
    if not chosen:
        raise DataError(None, "no subject matches --participant-label/--session-label")
    return chosen


def _subjects(bids_dir: Path, channels: Sequence[str], args: argparse.Namespace) -> Any:
    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.io.subjects import is_bids_root

    if not is_bids_root(bids_dir):
        raise DataError(bids_dir, "not a BIDS dataset (no dataset_description.json or sub-* folders)")
    if not channels:
        raise ConfigError(
            "the model reads one file per scan; BIDS input needs a model fitted with data.sequences "
            "(e.g. --set 'data.sequences=[T1w]' at fit time)"
        )
    found = list_items(bids_dir, channels)
    found.items = select(found.items, args.participant_label, args.session_label)
    return found


def run(args: argparse.Namespace) -> int:
    """The ``bids`` command: score the chosen subjects through the engine (participant), write the
    group report (group), or fit on them (group ``--fit``)."""
    import contextlib

    from anomaly3d_core.cli_common import check_out, load_model, report, warn_uncalibrated
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.mlops.models import is_model_uri

    bids_dir, out = Path(args.bids_dir), Path(args.output_dir)
    if out.resolve() == bids_dir.resolve():
        raise ConfigError("OUTPUT_DIR must differ from BIDS_DIR (e.g. BIDS_DIR/derivatives/anomaly3d)")
    if args.analysis_level == "group" and args.fit:
        return _fit(args, bids_dir)
    if args.fit:
        raise ConfigError(
            "--fit is a group-level step: anomaly3d bids BIDS_DIR OUTPUT_DIR group --fit --model OUT"
        )
    if args.calibration:
        raise ConfigError("--calibration calibrates a model while fitting it: use it with group --fit")
    check_out(str(out))
    with contextlib.ExitStack() as stack:
        pipe, _ = load_model(args, stack)
        uri = args.model if is_model_uri(args.model) else str(Path(args.model).resolve())
        if args.analysis_level == "group":
            return _group(pipe, out, uri)
        found = _subjects(bids_dir, pipe.channels, args)
        batch = Engine().score(pipe, found.items, out, bids_root=bids_dir, model_uri=uri)
    warn_uncalibrated(pipe)
    flagged = sum(bool(r["is_anomalous"]) for r in batch.rows)
    print(f"scored {len(batch.rows)} subject(s), {flagged} flagged anomalous; BIDS-Derivatives in {out}")
    return report(batch.failures, "scoring", found.errors)


def _group(pipe: Any, out: Path, uri: str) -> int:
    """Write ``report.html`` over every subject scored into ``out``."""
    from anomaly3d_core.reports import ReportWriter
    from anomaly3d_core.runner import read_scores, row_stem

    rows = read_scores(out)
    if not rows:
        raise DataError(out, "no scored subject here; run the participant level first")
    writer = ReportWriter(out, pipe, uri, sequences=pipe.channels)
    names = [row_stem(r) for r in rows]
    writer.add_from_folder(rows, names, bids=True)
    path = writer.group(rows, names)
    flagged = sum(str(r["is_anomalous"]) == "True" for r in rows)
    print(f"group report of {len(rows)} subject(s), {flagged} flagged anomalous: {path}")
    return 0


def _fit(args: argparse.Namespace, bids_dir: Path) -> int:
    """Train on the chosen subjects and write the model to ``--model`` (as ``anomaly3d fit`` does)."""
    from anomaly3d_core.cli_common import cli_engine, config_name, inputs, read_config, report
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.mlops.models import is_model_uri
    from anomaly3d_core.mlops.naming import set_name
    from anomaly3d_core.persistence import build_detector, reference_config

    if is_model_uri(args.model):
        raise ConfigError(f"--model {args.model}: group --fit writes a model folder, not an MLflow URI")
    config = read_config(args)
    found = _subjects(bids_dir, reference_config(config).data.channels, args)
    Engine.check_fit_target(args.model)
    calibration = inputs(args.calibration, config).items if args.calibration else None
    fitted = cli_engine(config, args).fit(
        build_detector(config),
        found.items,
        out=args.model,
        label=config_name(args.config),
        train_name=set_name(bids_dir),
        command="bids-fit",
        calibration=calibration,
    )
    pipe = fitted.detector
    print(
        f"model written to {fitted.folder} ({pipe.n_train_volumes_} training subjects); threshold {pipe.threshold_:.4g}"
    )
    print(pipe.postprocessor_.rule_summary())
    return report(fitted.failures, "fit", found.errors)
