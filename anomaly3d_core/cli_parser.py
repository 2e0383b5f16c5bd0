"""The ``anomaly3d`` command line's arguments: one parser, its sub-commands and their options.

Building the parser imports nothing heavy, so ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from anomaly3d_core.cli_common import EXIT_INPUTS_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE  # noqa: F401


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every usage error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.num_epochs=5 (repeatable)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details (plugins: show parameters)"
    )
    parser.add_argument(
        "-p",
        dest="top_plugin_switches" if top else "plugin_switches",  # before or after the command: both count
        action="append",
        default=[],
        metavar="no:PACKAGE",
        help="turn one plugin package off for this run, e.g. -p no:anomaly3d-extra (repeatable; "
        "like ANOMALY3D_DISABLE_PLUGINS)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="anomaly3d", description="Unsupervised anomaly detection in 3D medical images.")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser(
        "plugins",
        help="list every discovered component by family, with package and version (-v: parameters), "
        "and broken or disabled plugin packages",
    )
    _common(p)

    p = sub.add_parser("demo", help="make demo data, fit, score, evaluate and log to MLflow")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--size", default="small", help="demo data size: tiny, small, medium, large")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="pipeline YAML (default: built-in defaults)")
    p.add_argument(
        "--register",
        metavar="NAME[@ALIAS]",
        help="register the run's model in the MLflow registry under NAME, alias ALIAS (default "
        "'champion'), servable as models:/NAME@ALIAS (also: tracking.register_as); default anomaly3d-demo",
    )
    _common(p)

    p = sub.add_parser("demo-data", help="write the synthetic MNI152-based brain MRI data set")
    p.add_argument("out", help="output folder")
    p.add_argument("--size", default="small", help="tiny, small, medium or large")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voxel-size", type=float, default=2.0, help="mm per voxel (2 = the template's own grid)")
    p.add_argument(
        "--space",
        choices=("template", "native"),
        default="template",
        help="native: each scan with its own pose, voxel size, axis order, field of view and intensity units",
    )
    p.add_argument(
        "--sequences",
        default="T1w",
        help="comma-separated, of T1w, T2w, FLAIR (default T1w); several write train/ and test/ as BIDS",
    )
    _common(p)

    p = sub.add_parser("fit", help="train a pipeline on scans of normal subjects")
    p.add_argument("--config", help="pipeline YAML (default: built-in defaults)")
    p.add_argument("--train", required=True, help="folder, file or glob of normal training scans")
    p.add_argument("--val", help="optional held-out normal scans for early stopping and calibration")
    p.add_argument(
        "--calibration",
        help="held-out normal scans used only to calibrate the p-values (never to train or pick the epoch); "
        "at least ceil(1/alpha)-1 of them (19 for alpha 0.05)",
    )
    p.add_argument("--out", required=True, help="model folder to write (an MLflow model)")
    p.add_argument(
        "--register",
        metavar="NAME[@ALIAS]",
        help="register the run's model in the MLflow registry under NAME, alias ALIAS (default "
        "'champion'), servable as models:/NAME@ALIAS (also: tracking.register_as)",
    )
    _common(p)

    p = sub.add_parser("score", help="write score maps, masks and scores.csv for new scans")
    p.add_argument(
        "--model", required=True, help="model folder written by fit, or an MLflow URI (models:/NAME@ALIAS)"
    )
    p.add_argument(
        "--input",
        required=True,
        help="file, folder or glob of scans (--engine spark: also a .csv/.parquet table with a 'path' column)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="spark: score on Spark through the model's spark_udf (needs anomaly3d[spark])",
    )
    p.add_argument(
        "--master", default="local[*]", help="Spark master URL for --engine spark (default: local[*])"
    )
    _common(p)

    p = sub.add_parser("evaluate", help="score scans and compare with ground-truth masks")
    p.add_argument(
        "--model", required=True, help="model folder written by fit, or an MLflow URI (models:/NAME@ALIAS)"
    )
    p.add_argument("--input", required=True, help="file, folder or glob of scans")
    p.add_argument(
        "--masks",
        required=True,
        help="folder of ground-truth masks: the scan's own name, <stem>_mask.* or <stem>_seg.* "
        "(a subject's stem, e.g. sub-01_ses-1.nii.gz)",
    )
    p.add_argument("--out", required=True)
    _common(p)

    p = sub.add_parser("tune", help="search hyper-parameters with Optuna (search space in the YAML)")
    p.add_argument("--config", required=True)
    p.add_argument("--train", help="normal training scans (required unless --write-best)")
    p.add_argument("--val", help="labelled validation scans (else synthetic anomalies in held-out normals)")
    p.add_argument("--val-masks", help="masks of --val")
    p.add_argument("--n-trials", type=int, default=None)
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (sqlite:///optuna.db, postgresql://..., or a .log journal file)",
    )
    p.add_argument("--study-name", default="anomaly3d")
    p.add_argument("--timeout", type=float, default=None, help="seconds")
    p.add_argument("--out", default="tuning_output", help="where the best config and model go")
    p.add_argument(
        "--write-best",
        action="store_true",
        help="only write the study's best config and model now (normally the last worker to finish does)",
    )
    p.add_argument(
        "--register",
        metavar="NAME[@ALIAS]",
        help="register the run's model in the MLflow registry under NAME, alias ALIAS (default "
        "'champion'), servable as models:/NAME@ALIAS (also: tracking.register_as); default anomaly3d-STUDY",
    )
    _common(p)

    from anomaly3d_core.bids_app import add_parser as add_bids_parser

    add_bids_parser(sub, _common)  # anomaly3d bids BIDS_DIR OUTPUT_DIR participant|group
    return parser


def configure(args: argparse.Namespace) -> int | None:
    """Logging, warnings and plugin switches (``-p no:PACKAGE``) for one command; an exit code when
    the arguments are refused, else ``None``."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    if args.debug:  # tracebacks of the inputs a batch skipped, too
        logging.getLogger("anomaly3d_core").setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from anomaly3d_core import registry

    registry.exit_on_hang = True  # a plugin package that hangs at import ends the command, named
    switches = getattr(args, "top_plugin_switches", []) + getattr(args, "plugin_switches", [])
    if switches:
        from anomaly3d_core.registry import DISABLE_PLUGINS_ENV

        bad = [p for p in switches if not p.startswith("no:") or not p[3:].strip()]
        if bad:
            print(
                f"anomaly3d: error: -p {bad[0]}: only -p no:PACKAGE (turn a plugin package off) is supported",
                file=sys.stderr,
            )
            return EXIT_USAGE
        names = [p[3:].strip() for p in switches]
        current = os.environ.get(DISABLE_PLUGINS_ENV, "")
        os.environ[DISABLE_PLUGINS_ENV] = ",".join([current, *names] if current else names)
    if not args.debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    return None
