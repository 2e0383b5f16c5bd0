"""Choosing the synthetic-anomaly detector's settings on the tuning set, never on the test set.

    python experiments/synthetic_check.py [--data DIR] [--out DIR] [--set KEY=VALUE ...] [--label NAME]

Fits ``brain_mri_synthetic.yaml`` (with ``--set`` overrides) on the native benchmark's 16 training
normals and scores its *tuning* set (2 normals, 6 scans with ``tumour`` or ``infarct`` lesions;
``experiments/bench_data.py``). Prints the validation history the fit recorded (voxel AP on
held-out training normals with synthetic anomalies of other kinds) and the tuning-set figures, so
one can see whether the fit's own validation predicts the tuning set. One JSON row per run is
appended to ``synthetic_check.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_data import make_benchmark_data  # noqa: E402
from benchmark_native import metrics, read_scan, split_files  # noqa: E402

CONFIG = HERE / "configs" / "brain_mri_synthetic.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/native"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spinning on a busy machine)"
    )
    args = parser.parse_args()
    import logging

    import torch

    from anomaly3d_core.persistence import build_detector, load_any_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    make_benchmark_data(args.data, space="native")
    config = load_any_config(args.config, ["tracking.enabled=false", "data.cache=false", *args.overrides])
    det = build_detector(config)
    t0, c0 = time.perf_counter(), time.process_time()
    det.fit(sorted((args.data / "train").glob("*.nii.gz")))
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    paths, _ = split_files(args.data, "tune")
    truths, scores, vscores, seconds = [], [], [], []
    for path in paths:
        t1 = time.perf_counter()
        r = det.score(path)
        seconds.append(time.perf_counter() - t1)
        image, _ = read_scan(path)
        mask, _ = read_scan(args.data / "tune_masks" / path.name)
        fg = image != 0
        truths.append(mask[fg] > 0)
        scores.append(np.asarray(r.score_map)[fg])
        vscores.append(r.volume_score)
    row = {
        "label": args.label or " ".join(args.overrides) or "preset",
        "config": args.config.name,
        "overrides": args.overrides,
        "history": det.history_,
        "tune": metrics(truths, scores, vscores),
        "fit_seconds": round(fit_s, 1),
        "fit_cpu_seconds": round(fit_cpu, 1),
        "seconds_per_scan": round(float(np.median(seconds)), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(row, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "synthetic_check.json"
    rows = json.loads(log.read_text()) if log.is_file() else []
    log.write_text(json.dumps([*rows, row], indent=1) + "\n")


if __name__ == "__main__":
    main()
