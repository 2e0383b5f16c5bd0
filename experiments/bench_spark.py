"""Scoring 32 demo scans with ``anomaly3d score`` and with ``anomaly3d score --engine spark`` (local mode).

    python experiments/bench_spark.py [--data bench_output/spark] [--out experiments/results] [--cores 2]

Data: 32 test scans of the demo set on its 2 mm grid (16 normal, 16 lesioned), a model fitted on 8
normals with ``brain_mri.yaml`` (5 epochs: the figures are about scoring, not about the model).
Two measures, each the median of ``--repeats`` runs:

- *command*: the wall time of each command as a user runs it, start-up included (Python imports;
  for Spark also the JVM, the Python workers' imports and one model load per worker);
- *warm*: scoring the same scans again in one process that has already scored once (a Spark
  session with its workers up, or a loaded detector): the throughput an archive-sized job sees.

Memory: the peak RSS of the ``anomaly3d score`` process and of the largest Spark Python worker.
Both outputs are compared voxel for voxel, and their ``scores.csv`` row for row. Figures are
printed and written to ``bench_spark.json`` and ``bench_spark.md`` in ``--out``.
Goal: Spark within 1.3x of ``anomaly3d score`` on 2 cores; the same maps.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "anomaly3d_core"]


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS of the command's own process and of its largest Spark Python worker (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"main": 0.0, "worker": 0.0}

    def poll() -> None:
        while proc.poll() is None:
            for pid in descendants(proc.pid):
                key = "main" if pid == proc.pid else "worker" if "pyspark" in cmdline(pid) else None
                if key:
                    peaks[key] = max(peaks[key], rss_mib(pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    output = proc.communicate()[0].decode(errors="replace")
    seconds = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return seconds, peaks["main"], peaks["worker"]


def prepare(data: Path, env: dict[str, str]) -> tuple[Path, Path]:
    from anomaly3d_core.demo.datasets import make_demo_dataset

    if not (data / "manifest.csv").is_file():
        make_demo_dataset(
            data, "tiny", seed=0, voxel_size=2.0, n_train=8, n_test_normal=16, n_test_anomalous=16
        )
    model = data / "model"
    if not (model / "MLmodel").is_file():
        fit = [
            *CLI,
            "fit",
            "--config",
            str(HERE / "configs" / "brain_mri.yaml"),
            "--train",
            str(data / "train"),
        ]
        sets = ["--set", "training.num_epochs=5", "--set", "tracking.enabled=false"]
        subprocess.run([*fit, *sets, "--out", str(model)], env=env, check=True, capture_output=True)
    return data / "test", model


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: r["file"])


def same_outputs(a: Path, b: Path) -> int:
    """The number of maps that are equal voxel for voxel (and in grid) in both folders; raises on any difference."""
    rows_a, rows_b = read_csv(a / "scores.csv"), read_csv(b / "scores.csv")
    if rows_a != rows_b:
        raise SystemExit(f"scores.csv differs between {a} and {b}")
    n = 0
    for row in rows_a:
        for key in ("score_map", "mask"):
            ia, ib = nib.load(a / row[key]), nib.load(b / row[key])
            if not (
                np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
                and np.array_equal(ia.affine, ib.affine)
            ):
                raise SystemExit(f"{row[key]} differs between {a} and {b}")
            n += 1
    return n


def warm_seconds(test: Path, model: Path, work: Path, cores: int, repeats: int) -> tuple[float, float]:
    """Seconds to score ``test`` again once warm: with a loaded detector, and with a running Spark session."""
    import torch

    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.mlops.spark import score_with_spark, spark_session
    from anomaly3d_core.persistence import load_detector
    from anomaly3d_core.runner import score_files

    torch.set_num_threads(cores)
    detector, inputs = load_detector(model), list_inputs(test)
    score_files(detector, inputs[:2], work / "warm-local", reports=False)
    local = []
    for i in range(repeats):
        t0 = time.perf_counter()
        score_files(detector, inputs, work / f"local-{i}", reports=False)
        local.append(time.perf_counter() - t0)
    spark = spark_session(f"local[{cores}]", "anomaly3d-bench")
    score_with_spark(str(model), str(test), work / "warm-spark", spark=spark)  # workers up, model loaded
    remote = []
    for i in range(repeats):
        t0 = time.perf_counter()
        score_with_spark(str(model), str(test), work / f"spark-{i}", spark=spark)
        remote.append(time.perf_counter() - t0)
    spark.stop()
    return statistics.median(local), statistics.median(remote)


def crossovers(n: int, cmd_local: float, cmd_spark: float, warm_local: float, warm_spark: float) -> dict:
    """How many scans a command needs before Spark is within 1.3x of ``score``, and before it is faster,
    with start-up as measured (command minus warm) and the warm time per scan."""
    start_local, start_spark = cmd_local - warm_local, cmd_spark - warm_spark
    per_local, per_spark = warm_local / n, warm_spark / n

    def scans(ratio: float) -> int | None:
        gain = ratio * per_local - per_spark
        return None if gain <= 0 else max(1, math.ceil((start_spark - ratio * start_local) / gain))

    return {"within_1.3x_from": scans(1.3), "faster_from": scans(1.0)}


def scans_text(n: int | None) -> str:
    return f"from about {n} scans" if n is not None else "at no number of scans (no lower time per scan)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="bench_output/spark")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    data = Path(args.data)
    test, model = prepare(data, env)
    n = len(list(test.glob("*.nii.gz")))
    work = data / "runs"
    shutil.rmtree(work, ignore_errors=True)
    local_runs, spark_runs = [], []
    for i in range(args.repeats):  # alternated, so load from elsewhere hits both alike
        local_runs.append(
            run_timed(
                [*CLI, "score", "--model", str(model), "--input", str(test), "--out", str(work / f"cli-{i}")],
                env,
            )
        )
        spark_cmd = [*CLI, "score", "--engine", "spark", "--master", f"local[{args.cores}]"]
        spark_runs.append(
            run_timed(
                [
                    *spark_cmd,
                    "--model",
                    str(model),
                    "--input",
                    str(test),
                    "--out",
                    str(work / f"cli-spark-{i}"),
                ],
                env,
            )
        )
    maps_equal = same_outputs(work / "cli-0", work / "cli-spark-0")
    warm_local, warm_spark = warm_seconds(test, model, work, args.cores, args.repeats)
    same_outputs(work / "cli-0", work / "spark-0")
    cmd_local = statistics.median(r[0] for r in local_runs)
    cmd_spark = statistics.median(r[0] for r in spark_runs)
    crossover = crossovers(n, cmd_local, cmd_spark, warm_local, warm_spark)
    result = {
        "scans": n,
        "cores": args.cores,
        "command_seconds": {"score": round(cmd_local, 2), "score --engine spark": round(cmd_spark, 2)},
        "command_ratio": round(cmd_spark / cmd_local, 2),
        "warm_seconds": {"score": round(warm_local, 2), "spark": round(warm_spark, 2)},
        "warm_ratio": round(warm_spark / warm_local, 2),
        "warm_scans_per_second": {"score": round(n / warm_local, 2), "spark": round(n / warm_spark, 2)},
        "peak_rss_mib": {
            "score process": round(max(r[1] for r in local_runs), 1),
            "spark driver (python)": round(max(r[1] for r in spark_runs), 1),
            "largest spark python worker": round(max(r[2] for r in spark_runs), 1),
        },
        "start_up_seconds": {
            "score": round(cmd_local - warm_local, 1),
            "spark": round(cmd_spark - warm_spark, 1),
        },
        "scans_estimate": crossover,
        "maps_equal_voxel_for_voxel": maps_equal,
        "goal_ratio": 1.3,
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, local[{args.cores}]",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_spark.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"| {n} demo scans (2 mm), {args.cores} cores | `anomaly3d score` | `--engine spark` (local[{args.cores}]) | ratio |",
        "|---|---|---|---|",
        f"| command, start-up included | {cmd_local:.1f} s | {cmd_spark:.1f} s | {cmd_spark / cmd_local:.2f}x |",
        f"| warm (session and model loaded) | {warm_local:.1f} s | {warm_spark:.1f} s | {warm_spark / warm_local:.2f}x |",
        f"| peak RSS | {result['peak_rss_mib']['score process']:.0f} MiB | "
        f"{result['peak_rss_mib']['largest spark python worker']:.0f} MiB per worker "
        f"(driver {result['peak_rss_mib']['spark driver (python)']:.0f} MiB) | |",
        "",
        f"Start-up (command minus warm): {cmd_local - warm_local:.1f} s for `score`, {cmd_spark - warm_spark:.1f} s "
        f"for Spark. From the measured start-up and per-scan times, Spark is within 1.3x "
        + scans_text(crossover["within_1.3x_from"])
        + " and faster "
        + scans_text(crossover["faster_from"])
        + ".",
        "",
        f"All {maps_equal} maps (score maps and masks) are equal voxel for voxel, and scores.csv row for row.",
        f"{result['machine']}; median of {args.repeats} runs.",
    ]
    (out / "bench_spark.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
