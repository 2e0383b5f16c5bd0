"""``anomaly3d demo-data`` and ``anomaly3d demo``: demo data, then fit, score and evaluate on it
through the engine, as one tracked run."""

from __future__ import annotations

import argparse
import time

from anomaly3d_core.cli_common import (
    EXIT_OK,
    check_out,
    cli_engine,
    config_name,
    inputs,
    print_advice,
    read_config,
    registration,
    report,
)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from anomaly3d_core.demo.datasets import make_demo_dataset

    check_out(args.out)
    sequences = tuple(s.strip() for s in args.sequences.split(",") if s.strip())
    out = make_demo_dataset(
        args.out, args.size, args.seed, voxel_size=args.voxel_size, space=args.space, sequences=sequences
    )
    layout = "BIDS datasets train/ and test/" if sequences != ("T1w",) else "train/, test/"
    print(f"demo data written to {out} ({layout}, test_masks/, manifest.csv)")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.evaluator import summary_table
    from anomaly3d_core.mlops.naming import set_name
    from anomaly3d_core.mlops.tracking import ui_command
    from anomaly3d_core.persistence import build_detector, reference_config

    config = read_config(args)
    register = registration(args, config, default="anomaly3d-demo")
    out = check_out(args.out)
    channels = reference_config(config).data.channels  # several sequences: demo data written as BIDS
    data = out / ("data" if not channels else "data_" + "_".join(channels))
    t0 = time.perf_counter()
    if not (data / "manifest.csv").is_file():
        what = f"{args.size}, {' + '.join(channels)}, BIDS" if channels else args.size
        print(f"[1/4] making demo data ({what}) in {data} ...", flush=True)
        make_demo_dataset(data, args.size, args.seed, sequences=tuple(channels or ["T1w"]))
    else:
        print(f"[1/4] using demo data in {data}", flush=True)
    train, tests = inputs(str(data / "train"), config), inputs(str(data / "test"), config)
    print_advice(config, train.items)
    engine = cli_engine(config, args)
    with engine.run("demo", config, config_name(args.config), set_name(data / "train")) as run:
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
            model_uri=str((out / "model").resolve()),
        )
    print("\n" + summary_table(result.metrics))
    print(f"score maps and masks : {out / 'scores'}")
    print(f"plots and metrics    : {out / 'evaluation'}")
    print(f"reports (open these) : {out / 'evaluation' / 'report.html'}, {out / 'scores' / 'report.html'}")
    print(f"model (MLflow model) : {out / 'model'}")
    if run is not None:
        print(f"MLflow run           : {run.info.run_id}  ->  {ui_command(config, run.info.experiment_id)}")
        if register:
            print(f"registered model     : models:/{register[0]}@{register[1]}  ->  make serve")
    print(f"total {time.perf_counter() - t0:.0f} s")
    result.failures.items.extend(batch.failures.items)
    return report(result.failures, "demo", [*train.errors, *tests.errors])
