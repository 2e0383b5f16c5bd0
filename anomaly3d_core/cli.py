"""The ``anomaly3d`` command line (also ``python -m anomaly3d_core``): it parses the arguments
(:mod:`.cli_parser`), runs the engine's flows (:mod:`anomaly3d_core.engine`) and prints.

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

from anomaly3d_core.cli_parser import EXIT_INPUTS_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, build_parser
from anomaly3d_core.cli_plugins import cmd_plugins
from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError, PluginError

__all__ = ["COMMANDS", "EXIT_INPUTS_FAILED", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
log = logging.getLogger("anomaly3d")


def _config(args: argparse.Namespace) -> Any:
    """Every command reads its config through this one validated path."""
    from anomaly3d_core.persistence import load_any_config

    return load_any_config(getattr(args, "config", None), args.overrides)


def _check_out(path: str) -> Path:
    from anomaly3d_core.io.files import check_output_dir

    return check_output_dir(path)


def _load_model(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[Any, Path]:
    """The saved detector (a folder, or a ``models:/``/``runs:/`` URI fetched for the command's
    duration), with any ``--set data.loader...`` reading options applied, and its folder."""
    from anomaly3d_core.mlops.tracking import fetch_model, is_model_uri
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


def _engine(config: Any) -> Any:
    """The engine as the command line runs it: MLflow tracking as the config says, MLflow model folders."""
    from anomaly3d_core.mlops.tracker import engine_for

    return engine_for(config)


def _register(args: argparse.Namespace, config: Any, default: str | None = None) -> tuple[str, str] | None:
    """``(name, alias)`` from ``--register``, else ``tracking.register_as``, else ``default``."""
    from anomaly3d_core.mlops.tracking import parse_register

    if not config.tracking.enabled:
        return None
    return parse_register(getattr(args, "register", None) or config.tracking.register_as or default)


def _inputs(spec: str, config_or_model: Any) -> Any:
    """Files, or subjects when the config names several sequences (``data.sequences``)."""
    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.persistence import reference_config

    return list_items(spec, reference_config(config_or_model).data.channels)


def _report(failures: Any, what: str, refused: Sequence[Any] = ()) -> int:
    for error in refused:  # subjects refused while grouping their files
        failures.add(error)
    if failures:
        print(f"\n{len(failures)} input(s) failed during {what}:\n{failures.report()}", file=sys.stderr)
        return EXIT_INPUTS_FAILED
    return EXIT_OK


def _names(spec: str | Path) -> str:
    """The readable name of the scan set a ``--train``/``--input`` argument names."""
    from anomaly3d_core.mlops.naming import data_folder, set_name

    return set_name(data_folder(spec))


def _label(config_path: str | None) -> str:
    from anomaly3d_core.mlops.tracking import config_label

    return config_label(config_path)


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
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.persistence import build_detector

    config = _config(args)
    register = _register(args, config)
    Engine.check_fit_target(args.out)  # before any work
    found = _inputs(args.train, config)
    val = _inputs(args.val, config).items if args.val else None
    fitted = _engine(config).fit(
        build_detector(config),
        found.items,
        val,
        args.out,
        label=_label(args.config),
        train_name=_names(args.train),
        val_name=_names(args.val) if val else None,
        register=register,
        before=lambda: _print_advice(config, found.items),
    )
    if fitted.folder is None:  # another torchrun rank: rank 0 writes and reports
        return EXIT_OK
    pipe = fitted.detector
    print(
        f"model written to {fitted.folder} ({pipe.n_train_volumes_} training, {pipe.n_val_volumes_} validation volumes, "
        f"{len(pipe.history_['train_loss'])} epochs, {pipe.fit_seconds_:.1f} s); threshold {pipe.threshold_:.4g}"
    )
    _print_registered(register)
    return _report(fitted.failures, "fit", found.errors)


def _print_registered(register: tuple[str, str] | None) -> None:
    if register:
        print(
            f"registered as models:/{register[0]}@{register[1]} (serve: make serve MODEL=models:/{register[0]}@{register[1]})"
        )


def _print_advice(config: Any, scans: list[Any]) -> None:
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
        + found.advice(first.threshold.normative, first.data.preprocessing.register_to),
        flush=True,
    )


def cmd_score(args: argparse.Namespace) -> int:
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.mlops.tracking import is_model_uri

    out = _check_out(args.out)
    if args.engine == "spark":
        return _score_on_spark(args, out)
    with contextlib.ExitStack() as stack:
        pipe, _ = _load_model(args, stack)
        found = _inputs(args.input, pipe)
        uri = args.model if is_model_uri(args.model) else str(Path(args.model).resolve())
        batch = Engine().score(pipe, found.items, out, bids_root=found.bids_root, model_uri=uri)
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anomaly3d_core.runner import summary_table

    out = _check_out(args.out)
    with contextlib.ExitStack() as stack:
        pipe, folder = _load_model(args, stack)
        found = _inputs(args.input, pipe)
        engine = _engine(pipe.config)
        lineage = engine.model_lineage(folder, pipe.config)
        result = engine.evaluate(
            pipe,
            found.items,
            args.masks,
            out,
            label=lineage.get("config") or Path(args.model.rstrip("/")).name,
            data_name=_names(args.input),
            data_source=args.input,
            model=args.model,
            lineage=lineage,
        )
    print(summary_table(result.metrics) + f"metrics.json, summary.txt and plots in {args.out}")
    return _report(result.failures, "evaluation", found.errors)


def cmd_demo(args: argparse.Namespace) -> int:
    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.mlops.naming import set_name
    from anomaly3d_core.mlops.tracking import ui_command
    from anomaly3d_core.persistence import build_detector, reference_config
    from anomaly3d_core.runner import summary_table

    config = _config(args)
    register = _register(args, config, default="anomaly3d-demo")
    out = _check_out(args.out)
    channels = reference_config(config).data.channels  # several sequences: demo data written as BIDS
    data = out / ("data" if not channels else "data_" + "_".join(channels))
    t0 = time.perf_counter()
    if not (data / "manifest.csv").is_file():
        what = f"{args.size}, {' + '.join(channels)}, BIDS" if channels else args.size
        print(f"[1/4] making demo data ({what}) in {data} ...", flush=True)
        make_demo_dataset(data, args.size, args.seed, sequences=tuple(channels or ["T1w"]))
    else:
        print(f"[1/4] using demo data in {data}", flush=True)
    train, tests = _inputs(str(data / "train"), config), _inputs(str(data / "test"), config)
    _print_advice(config, train.items)
    engine = _engine(config)
    with engine.run("demo", config, _label(args.config), set_name(data / "train")) as run:
        print("[2/4] fitting on normal subjects ...", flush=True)
        pipe = build_detector(config)
        engine.fit(
            pipe, train.items, None, out / "model", train_name=set_name(data / "train"), register=register
        )
        print(f"      {pipe.fit_seconds_:.1f} s, {len(pipe.history_['train_loss'])} epochs", flush=True)
        print("[3/4] scoring test subjects ...", flush=True)
        batch = engine.score(
            pipe,
            tests.items,
            out / "scores",
            bids_root=tests.bids_root,
            model_uri=str((out / "model").resolve()),
            log_maps=config.tracking.log_score_maps,
        )
        print("[4/4] evaluating against ground truth ...", flush=True)
        result = engine.evaluate(
            pipe,
            tests.items,
            data / "test_masks",
            out / "evaluation",
            data_name=set_name(data / "test"),
            data_source=str(data / "test"),
        )
    print("\n" + summary_table(result.metrics))
    print(f"score maps and masks : {out / 'scores'}")
    print(f"plots and metrics    : {out / 'evaluation'}")
    print(f"model (MLflow model) : {out / 'model'}")
    if run is not None:
        print(f"MLflow run           : {run.info.run_id}  ->  {ui_command(config)}")
        if register:
            print(f"registered model     : models:/{register[0]}@{register[1]}  ->  make serve")
    print(f"total {time.perf_counter() - t0:.0f} s")
    result.failures.items.extend(batch.failures.items)
    return _report(result.failures, "demo", [*train.errors, *tests.errors])


def cmd_tune(args: argparse.Namespace) -> int:
    from anomaly3d_core.config import PipelineConfig
    from anomaly3d_core.mlops.tuning import TuneRequest, run_tuning

    config = _config(args)
    if not isinstance(config, PipelineConfig):
        raise ConfigError(
            f"{args.config}: tune searches one pipeline's settings; an ensemble config cannot be tuned"
        )
    _check_out(args.out)
    fields = TuneRequest.__dataclass_fields__
    return run_tuning(config, TuneRequest(**{k: v for k, v in vars(args).items() if k in fields}))


COMMANDS = {
    "plugins": cmd_plugins,
    "demo": cmd_demo,
    "demo-data": cmd_demo_data,
    "fit": cmd_fit,
    "score": cmd_score,
    "evaluate": cmd_evaluate,
    "tune": cmd_tune,
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
