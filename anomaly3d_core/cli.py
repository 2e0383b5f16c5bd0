"""The ``anomaly3d`` command line (also ``python -m anomaly3d_core``).

Exit codes: 0 all went well, 1 some inputs failed, 2 usage or configuration error, 3 an
unexpected error (a bug or a system problem such as a full disk). Errors print one line;
``--debug`` shows the traceback.

Each command imports what it needs (torch, MLflow, Optuna) when it runs, so ``--help``, usage
and config errors answer without the seconds those imports take.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError, PluginError

log = logging.getLogger("anomaly3d")
EXIT_OK, EXIT_INPUTS_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
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
    parser = _Parser(prog="anomaly3d", description="Unsupervised anomaly detection in 3D medical images.")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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


def _config(args: argparse.Namespace) -> Any:
    """Every command reads its config through this one validated path."""
    from anomaly3d_core.persistence import load_any_config

    return load_any_config(getattr(args, "config", None), args.overrides)


def _check_out(path: str) -> Path:
    from anomaly3d_core.io.files import check_output_dir

    return check_output_dir(path)


def _load_model(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[Any, dict[str, str]]:
    """The saved detector (a folder, or a ``models:/``/``runs:/`` URI fetched for the command's
    duration), with any ``--set data.loader...`` reading options applied, and the run and logged
    model behind it, where known."""
    from anomaly3d_core.mlops.tracking import is_model_uri, read_lineage
    from anomaly3d_core.persistence import load_detector

    folder = Path(args.model)
    if is_model_uri(args.model):
        from anomaly3d_core.mlops.tracking import fetch_model

        folder = fetch_model(args.model, stack)
    pipe = load_detector(folder)
    # tracking.* is the run's (the model folder's own is ignored); the rest changes how scans are read
    run_sets = [o for o in args.overrides if o.strip().startswith("tracking.")]
    if run_sets:
        from anomaly3d_core.config import build_config

        pipe.config.tracking = build_config({}, run_sets).tracking
    reading = [o for o in args.overrides if o not in run_sets]
    if reading:
        pipe.set_reading(reading)
    return pipe, read_lineage(folder)


def _register(args: argparse.Namespace, config: Any, default: str | None = None) -> tuple[str, str] | None:
    """``(name, alias)`` from ``--register``, else ``tracking.register_as``, else ``default``."""
    from anomaly3d_core.mlops.tracking import parse_register

    if not config.tracking.enabled:
        return None
    return parse_register(getattr(args, "register", None) or config.tracking.register_as or default)


def _new_model(config: Any) -> Any:
    """A pipeline, an ensemble (``ensemble`` section) or a synthetic-anomaly detector (``synthetic``)."""
    from anomaly3d_core.persistence import build_detector

    return build_detector(config)


def _inputs(spec: str, config_or_model: Any) -> Any:
    """Files, or subjects when the config names several sequences (``data.sequences``)."""
    from anomaly3d_core.io.data import list_items

    if hasattr(config_or_model, "channels"):  # a detector
        channels = config_or_model.channels
    else:
        first = config_or_model.members[0] if hasattr(config_or_model, "members") else config_or_model
        channels = first.data.channels
    return list_items(spec, channels)


def _report(failures: Any, what: str, refused: Sequence[Any] = ()) -> int:
    for error in refused:  # subjects refused while grouping their files
        failures.add(error)
    if failures:
        print(f"\n{len(failures)} input(s) failed during {what}:\n{failures.report()}", file=sys.stderr)
        return EXIT_INPUTS_FAILED
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from anomaly3d_core.registry import DISABLE_PLUGINS_ENV, FAMILIES, get_registry

    reg = get_registry(warn=False)  # broken packages are listed below, not warned about
    for family in FAMILIES:
        print(f"{family}:")
        clashes = reg.clashes(family)
        for info in reg.infos(family):
            name = info.qualified if info.name in clashes else info.name
            print(
                f"  {name:<14}{info.package + ' ' + info.version:<24}{info.cls.__module__}.{info.cls.__qualname__}"
            )
            if args.verbose:
                for line in _component_details(info.cls):
                    print(f"      {line}")
    clashing = [(f, n, infos) for f in FAMILIES for n, infos in reg.clashes(f).items()]
    if clashing:
        print("\nname clashes (write package:name to choose one):")
        for family, name, infos in clashing:
            print(f"  {family[:-1]} '{name}': " + ", ".join(i.qualified for i in infos))
    if reg.broken:
        print("\nbroken plugin packages (skipped; everything else works):")
        for broken in reg.broken:
            print(f"  {broken.line()}")
    if reg.disabled or reg.unknown_disabled:
        print(f"\nturned off ({DISABLE_PLUGINS_ENV} or -p no:PACKAGE):")
        for package, version in reg.disabled:
            print(f"  {package} {version}")
        for package in reg.unknown_disabled:
            print(f"  {package} (not an installed plugin package)")
    for line in reg.deprecations:
        print(f"\ndeprecated: {line}")
    return EXIT_OK


def _component_details(cls: Any) -> list[str]:
    """One line per contract attribute and per parameter (type, default, description) of ``cls``."""
    from anomaly3d_core.interfaces import Autoencoder, FeatureExtractor, ThresholdMethod, VolumeLoader

    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [doc[0]] if doc and cls.__doc__ not in {c.__doc__ for c in cls.__mro__[1:]} else []
    if issubclass(cls, FeatureExtractor):
        lines.append(
            f"layers: {', '.join(cls.layers)} (default: {', '.join(cls.default_layers) or 'none'})"
            if cls.layers
            else "layers: set from the parameters"
        )
    elif issubclass(cls, Autoencoder):
        lines.append(
            "fitted by "
            + ("the gradient loop" if cls.trainable else "fit_closed_form (no gradient loop)")
            + ("" if cls.per_feature_residual else "; one score per patch")
        )
    elif issubclass(cls, ThresholdMethod):
        lines.append(f"calibration: {cls.calibration}")
    elif issubclass(cls, VolumeLoader):
        what = ", ".join(cls.extensions) or "no extension"
        lines.append(f"reads: {what}" + (", folders" if cls.reads_directories else ""))
    fields = cls.Params.model_fields
    if not fields:
        lines.append("parameters: none")
    for name, field in fields.items():
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = f"default {value!r}"
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"{name}: {_type_name(field.annotation)}, {default}{desc}")
    return lines


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def cmd_demo_data(args: argparse.Namespace) -> int:
    from anomaly3d_core.demo.datasets import make_demo_dataset

    _check_out(args.out)
    sequences = tuple(s.strip() for s in args.sequences.split(",") if s.strip())
    out = make_demo_dataset(
        args.out, args.size, args.seed, voxel_size=args.voxel_size, space=args.space, sequences=sequences
    )
    layout = "BIDS datasets train/ and test/" if sequences != ("T1w",) else "train/, test/"
    print(f"demo data written to {out} ({layout}, test_masks/, manifest.csv)")
    return EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    from anomaly3d_core.io.files import check_model_target, write_lock
    from anomaly3d_core.mlops.naming import data_folder, set_name
    from anomaly3d_core.mlops.tracking import command_run, config_label, epoch_logger

    config = _config(args)
    from anomaly3d_core.model import distributed

    distributed.init_from_env()
    register = _register(args, config)
    if distributed.is_main():
        check_model_target(args.out)  # before any work
    found = _inputs(args.train, config)
    train = found.items
    val = _inputs(args.val, config).items if args.val else None
    pipe = _new_model(config)
    if not distributed.is_main():  # other torchrun ranks train alongside; rank 0 writes and logs
        pipe.fit(train, val, show_progress=False)
        return EXIT_OK
    # held from the start, so a second `fit` into the same folder stops at once instead of after training
    with write_lock(args.out, "model folder"):
        _print_advice(config, train)
        name = set_name(data_folder(args.train))
        with command_run(config, "fit", config_label(args.config), name, overrides=args.overrides) as run:
            pipe.fit(train, val, callbacks=[epoch_logger()] if run else ())
            if args.calibration:
                pipe.calibrate(_inputs(args.calibration, config).items)
            sets = None
            if run is not None:
                from anomaly3d_core.mlops.tracking import fit_datasets

                sets = fit_datasets(pipe, train, val, name, set_name(data_folder(args.val)) if val else None)
            out = _save_fit(pipe, Path(args.out), register, sets)
    print(
        f"model written to {out} ({pipe.n_train_volumes_} training, {pipe.n_val_volumes_} validation volumes, "
        f"{len(pipe.history_['train_loss'])} epochs, {pipe.fit_seconds_:.1f} s); voxel threshold {pipe.threshold_:.4g}"
    )
    post = pipe.postprocessor_
    print(
        f"calibrated on {post.n_calibration} normal scan(s): a scan is flagged when its p-value <= alpha "
        f"{post.config.alpha:g} ({post.config.scan_statistic} > {post.scan_threshold:.4g}); mask: {post.config.mask_rule}"
    )
    _print_registered(register)
    return _report(pipe.failures_, "fit", found.errors)


def _save_fit(pipe: Any, out: Path, register: tuple[str, str] | None, sets: Any) -> Path:
    """Log the fitted model to the active run (its data sets, the model, registered when asked,
    fit metrics, the training curves), then write the model folder, which names that run."""
    from anomaly3d_core.evaluation.plotting import plot_training_curves
    from anomaly3d_core.mlops.tracking import (
        LINEAGE_KEY,
        lineage,
        log_artifact,
        log_datasets,
        log_fit_metrics,
        log_model,
    )

    metadata = None
    if sets is not None:
        log_datasets(sets)
        info = log_model(pipe, register)
        metadata = {LINEAGE_KEY: lineage(info)}
        log_fit_metrics(pipe, sets, info.model_id if info is not None else None)
    written = pipe.save(out, metadata)
    plot_training_curves(pipe.history_, out / "training_curves.png")
    log_artifact(out / "training_curves.png", "plots")
    return written


def _print_registered(register: tuple[str, str] | None) -> None:
    if register:
        print(
            f"registered as models:/{register[0]}@{register[1]} (serve: make serve MODEL=models:/{register[0]}@{register[1]})"
        )


def _print_advice(config: Any, scans: list[Any]) -> None:
    """Tell the user what the scans are (one template grid or their own space) and which preset suits them."""
    from anomaly3d_core.io.subjects import Subject
    from anomaly3d_core.preprocess.registration import mni152_reference
    from anomaly3d_core.preprocess.survey import survey

    first = config.members[0] if hasattr(config, "members") else config
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


def cmd_score(args: argparse.Namespace) -> int:
    from anomaly3d_core.mlops.tracking import is_model_uri
    from anomaly3d_core.runner import score_files

    out = _check_out(args.out)
    if args.engine == "spark":
        return _score_on_spark(args, out)
    with contextlib.ExitStack() as stack:
        pipe, _ = _load_model(args, stack)
        found = _inputs(args.input, pipe)
        uri = args.model if is_model_uri(args.model) else str(Path(args.model).resolve())
        batch = score_files(pipe, found.items, out, bids_root=found.bids_root, model_uri=uri)
    flagged = sum(bool(r["is_anomalous"]) for r in batch.rows)
    where = "a BIDS-Derivatives dataset" if found.bids_root is not None else "maps and scores.csv"
    print(f"scored {len(batch.rows)} volume(s), {flagged} flagged anomalous; {where} in {args.out}")
    return _report(batch.failures, "scoring", found.errors)


def _score_on_spark(args: argparse.Namespace, out: Path) -> int:
    from anomaly3d_core.mlops.spark import require_pyspark, score_with_spark

    require_pyspark()
    if args.overrides:
        raise ConfigError("--set (reading options) is not supported with --engine spark")
    batch = score_with_spark(args.model, args.input, out, args.master)
    flagged = sum(bool(r["is_anomalous"]) for r in batch.rows)
    print(
        f"scored {len(batch.rows)} volume(s) on Spark, {flagged} flagged anomalous; maps and scores.csv in {args.out}"
    )
    return _report(batch.failures, "scoring")


def _evaluation_set(inputs: list[Any], failures: Any, masks: Path, spec: str, name: str) -> Any:
    """The scans an evaluation scored (failed ones left out) with their masks, as an MLflow dataset."""
    from anomaly3d_core.mlops.datasets import ScanSet, leave_out
    from anomaly3d_core.mlops.naming import data_folder

    used = leave_out(inputs, [path for path, _ in failures.items])
    return ScanSet(used, name=name, masks=masks, source=data_folder(spec))


def _model_metrics(pipe: Any) -> dict[str, float]:
    return {"threshold": pipe.threshold_, "volume_threshold": pipe.volume_threshold_}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anomaly3d_core.mlops.naming import data_folder, set_name
    from anomaly3d_core.mlops.tracking import (
        command_run,
        link_model,
        log_artifact,
        log_datasets,
        log_metrics,
        source_run,
    )
    from anomaly3d_core.runner import evaluate_files, summary_table

    out = _check_out(args.out)
    with contextlib.ExitStack() as stack:
        pipe, lineage = _load_model(args, stack)
        found = _inputs(args.input, pipe)
        name = set_name(data_folder(args.input))
        if pipe.config.tracking.enabled:
            lineage = source_run(lineage, pipe.config)
        config_name = lineage.get("config") or Path(args.model.rstrip("/")).name
        with command_run(pipe.config, "evaluate", config_name, name, overrides=args.overrides) as run:
            model_id = link_model(args.model, lineage) if run else None
            metrics, failures = evaluate_files(pipe, found.items, Path(args.masks), out, model_uri=args.model)
            dataset = None
            if run is not None:
                dataset = _evaluation_set(found.items, failures, Path(args.masks), args.input, name)
                log_datasets([(dataset, "evaluation")])
            log_metrics({**metrics, **_model_metrics(pipe)}, model_id=model_id, dataset=dataset)
            log_artifact(args.out, "evaluation")
    print(summary_table(metrics) + f"metrics.json, summary.txt and plots in {args.out}")
    return _report(failures, "evaluation", found.errors)


def cmd_demo(args: argparse.Namespace) -> int:
    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.mlops.naming import set_name
    from anomaly3d_core.mlops.tracking import (
        command_run,
        config_label,
        epoch_logger,
        fit_datasets,
        log_artifact,
        log_datasets,
        log_metrics,
        ui_command,
    )
    from anomaly3d_core.runner import evaluate_files, score_files, summary_table

    config = _config(args)
    register = _register(args, config, default="anomaly3d-demo")
    out = _check_out(args.out)
    first = config.members[0] if hasattr(config, "members") else config
    channels = first.data.channels  # several sequences: the demo data is written as BIDS with them
    data = out / ("data" if not channels else "data_" + "_".join(channels))
    t0 = time.perf_counter()
    if not (data / "manifest.csv").is_file():
        what = f"{args.size}, {' + '.join(channels)}, BIDS" if channels else args.size
        print(f"[1/4] making demo data ({what}) in {data} ...", flush=True)
        make_demo_dataset(data, args.size, args.seed, sequences=tuple(channels or ["T1w"]))
    else:
        print(f"[1/4] using demo data in {data}", flush=True)
    pipe = _new_model(config)
    train, tests = _inputs(str(data / "train"), config), _inputs(str(data / "test"), config)
    _print_advice(config, train.items)
    name = set_name(data / "train")
    with command_run(config, "demo", config_label(args.config), name, overrides=args.overrides) as run:
        print("[2/4] fitting on normal subjects ...", flush=True)
        pipe.fit(train.items, callbacks=[epoch_logger()] if run else ())
        sets = fit_datasets(pipe, train.items, None, name) if run else None
        _save_fit(pipe, out / "model", register, sets)
        print(f"      {pipe.fit_seconds_:.1f} s, {len(pipe.history_['train_loss'])} epochs", flush=True)
        print("[3/4] scoring test subjects ...", flush=True)
        uri = str((out / "model").resolve())
        batch = score_files(pipe, tests.items, out / "scores", bids_root=tests.bids_root, model_uri=uri)
        print("[4/4] evaluating against ground truth ...", flush=True)
        metrics, failures = evaluate_files(
            pipe, tests.items, data / "test_masks", out / "evaluation", model_uri=uri
        )
        dataset = None
        if run is not None:
            dataset = _evaluation_set(
                tests.items, failures, data / "test_masks", str(data / "test"), set_name(data / "test")
            )
            log_datasets([(dataset, "evaluation")])
        log_metrics(metrics, dataset=dataset)
        log_artifact(out / "evaluation", "evaluation")
        for row in batch.rows[: config.tracking.log_score_maps]:
            log_artifact(out / "scores" / row["score_map"], "score_maps")
    print("\n" + summary_table(metrics))
    print(f"score maps and masks : {out / 'scores'}")
    print(f"plots and metrics    : {out / 'evaluation'}")
    print(f"reports (open these) : {out / 'evaluation' / 'report.html'}, {out / 'scores' / 'report.html'}")
    print(f"model (MLflow model) : {out / 'model'}")
    if run is not None:
        print(f"MLflow run           : {run.info.run_id}  ->  {ui_command(config, run.info.experiment_id)}")
        if register:
            print(f"registered model     : models:/{register[0]}@{register[1]}  ->  make serve")
    print(f"total {time.perf_counter() - t0:.0f} s")
    failures.items.extend(batch.failures.items)
    return _report(failures, "demo", [*train.errors, *tests.errors])


def cmd_tune(args: argparse.Namespace) -> int:
    from anomaly3d_core.config import PipelineConfig
    from anomaly3d_core.mlops.tuning import run_tuning

    config = _config(args)
    if not isinstance(config, PipelineConfig):
        raise ConfigError(
            f"{args.config}: tune searches one pipeline's settings; an ensemble or synthetic-detector "
            "config cannot be tuned"
        )
    _check_out(args.out)
    return run_tuning(config, args)


def cmd_bids(args: argparse.Namespace) -> int:
    from anomaly3d_core import bids_app

    return bids_app.run(args, sys.modules[__name__])


COMMANDS = {
    "plugins": cmd_plugins,
    "demo": cmd_demo,
    "demo-data": cmd_demo_data,
    "fit": cmd_fit,
    "score": cmd_score,
    "evaluate": cmd_evaluate,
    "tune": cmd_tune,
    "bids": cmd_bids,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
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
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, PluginError) as exc:
        if args.debug:
            raise
        print(f"anomaly3d {args.command}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as exc:
        if args.debug:
            raise
        print(f"anomaly3d {args.command}: input error: {exc}", file=sys.stderr)
        return EXIT_INPUTS_FAILED
    except Anomaly3DError as exc:
        if args.debug:
            raise
        print(f"anomaly3d {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a system problem: its own exit code, still one line
        if args.debug:
            raise
        text = " ".join(str(exc).split())
        print(
            f"anomaly3d {args.command}: unexpected error: {type(exc).__name__}"
            + (f": {text}" if text else "")
            + " (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
