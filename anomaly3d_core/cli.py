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
import sys
from collections.abc import Sequence
from pathlib import Path

from anomaly3d_core.cli_common import (
    check_out,
    cli_engine,
    config_name,
    data_name,
    inputs,
    load_model,
    print_advice,
    print_registered,
    read_config,
    registration,
    report,
    warn_uncalibrated,
)
from anomaly3d_core.cli_demo import cmd_demo, cmd_demo_data
from anomaly3d_core.cli_parser import (
    EXIT_INPUTS_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    configure,
)
from anomaly3d_core.cli_plugins import cmd_plugins
from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError, PluginError

__all__ = ["COMMANDS", "EXIT_INPUTS_FAILED", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
log = logging.getLogger("anomaly3d")


def cmd_fit(args: argparse.Namespace) -> int:
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.persistence import build_detector

    config = read_config(args)
    register = registration(args, config)
    Engine.check_fit_target(args.out)  # before any work
    found = inputs(args.train, config)
    val = inputs(args.val, config).items if args.val else None
    calibration = inputs(args.calibration, config).items if args.calibration else None
    fitted = cli_engine(config, args).fit(
        build_detector(config),
        found.items,
        val,
        args.out,
        label=config_name(args.config),
        train_name=data_name(args.train),
        val_name=data_name(args.val) if val else None,
        register=register,
        calibration=calibration,
        before=lambda: print_advice(config, found.items),
    )
    if fitted.folder is None:  # another torchrun rank: rank 0 writes and reports
        return EXIT_OK
    pipe = fitted.detector
    print(
        f"model written to {fitted.folder} ({pipe.n_train_volumes_} training, {pipe.n_val_volumes_} validation volumes, "
        f"{len(pipe.history_['train_loss'])} epochs, {pipe.fit_seconds_:.1f} s); voxel threshold {pipe.threshold_:.4g}"
    )
    print(pipe.postprocessor_.rule_summary())  # the rules in force (uncalibrated with too few normals)
    print_registered(register)
    return report(fitted.failures, "fit", found.errors)


def cmd_score(args: argparse.Namespace) -> int:
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.mlops.models import is_model_uri

    out = check_out(args.out)
    if args.engine == "spark":
        return _score_on_spark(args, out)
    with contextlib.ExitStack() as stack:
        pipe, _ = load_model(args, stack)
        found = inputs(args.input, pipe)
        uri = args.model if is_model_uri(args.model) else str(Path(args.model).resolve())
        batch = Engine().score(pipe, found.items, out, bids_root=found.bids_root, model_uri=uri)
    warn_uncalibrated(pipe)
    flagged = sum(bool(r["is_anomalous"]) for r in batch.rows)
    where = "a BIDS-Derivatives dataset" if found.bids_root is not None else "maps and scores.csv"
    print(f"scored {len(batch.rows)} volume(s), {flagged} flagged anomalous; {where} in {args.out}")
    return report(batch.failures, "scoring", found.errors)


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
    return report(batch.failures, "scoring")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anomaly3d_core.evaluator import summary_table

    out = check_out(args.out)
    with contextlib.ExitStack() as stack:
        pipe, folder = load_model(args, stack)
        found = inputs(args.input, pipe)
        engine = cli_engine(pipe.config, args)
        lineage = engine.model_lineage(folder, pipe.config)
        result = engine.evaluate(
            pipe,
            found.items,
            args.masks,
            out,
            label=lineage.get("config") or Path(args.model.rstrip("/")).name,
            data_name=data_name(args.input),
            data_source=args.input,
            model=args.model,
            lineage=lineage,
        )
    print(summary_table(result.metrics) + f"metrics.json, summary.txt and plots in {args.out}")
    return report(result.failures, "evaluation", found.errors)


def cmd_tune(args: argparse.Namespace) -> int:
    from anomaly3d_core.config import PipelineConfig
    from anomaly3d_core.mlops.tuning import TuneRequest, run_tuning

    config = read_config(args)
    if not isinstance(config, PipelineConfig):
        raise ConfigError(
            f"{args.config}: tune searches one pipeline's settings; an ensemble or synthetic-detector "
            "config cannot be tuned"
        )
    check_out(args.out)
    fields = TuneRequest.__dataclass_fields__
    return run_tuning(config, TuneRequest(**{k: v for k, v in vars(args).items() if k in fields}))


def cmd_bids(args: argparse.Namespace) -> int:
    from anomaly3d_core import bids_app

    return bids_app.run(args)


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
    refused = configure(args)
    if refused is not None:
        return refused
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
