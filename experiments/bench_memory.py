"""Peak memory of one detector on its own: fit on the native benchmark's training normals, score test scans.

    OMP_NUM_THREADS=1 python experiments/bench_memory.py [--config PRESET] [--data DIR] [--scans N] [--set KEY=VALUE ...]

The benchmark scripts' peak RSS includes their own bookkeeping (every test scan's score map and
truth kept for pooled metrics), so it overstates what a user's process needs. This script holds
nothing but the detector: it prints the process's peak RSS after ``fit`` and after scoring
``--scans`` test scans one by one (``resource.getrusage``, Linux: KiB), the fit and scoring times,
and writes ``bench_memory_<preset>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_mib() -> float:
    """The process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "brain_mri_synthetic.yaml")
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/native"))
    parser.add_argument("--scans", type=int, default=8, help="test scans to score")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from anomaly3d_core.persistence import build_detector, load_any_config

    config = load_any_config(args.config, ["tracking.enabled=false", "data.cache=false", *args.set])
    train = sorted((args.data / "train").glob("*.nii.gz"))
    tests = sorted((args.data / "test").glob("*.nii.gz"))[: args.scans]
    if not train or not tests:
        raise SystemExit(
            f"{args.data}: no train/ or test/ scans; run experiments/bench_data.py {args.data} --native"
        )
    t0 = time.process_time()
    detector = build_detector(config).fit(train, show_progress=False)
    fit_cpu = time.process_time() - t0
    after_fit = peak_mib()
    t0 = time.process_time()
    for path in tests:
        detector.score(path)
    result = {
        "config": args.config.name,
        "overrides": args.set,
        "n_train": len(train),
        "n_scored": len(tests),
        "fit_cpu_seconds": round(fit_cpu, 1),
        "score_cpu_seconds_per_scan": round((time.process_time() - t0) / len(tests), 2),
        "peak_rss_mib_after_fit": round(after_fit, 1),
        "peak_rss_mib_after_scoring": round(peak_mib(), 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_memory_{args.config.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
