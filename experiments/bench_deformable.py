"""The deformable step after the affine registration: time per 1 mm scan and how much anatomy it aligns.

    python experiments/bench_deformable.py [--out experiments/results] [--cases 2] [--repeats 3]

Scans: synthetic demo subjects at 1 mm (``bench_registration.make_cases``, kind ``subject``: each
with its own anatomy, i.e. a smooth deformation of a few mm of the atlas, its own contrast, bias
and noise, moved by a random affine). For each: the registration time with and without the
deformable step (``registration.register``, one SimpleITK thread as in the pipeline), the
template-grid intensity error inside the template's brain (mean |scan - template| after both
are z-scored in the brain: lower when the anatomy lines up better), the quality figures, the mean
displacement of the deformable step, and the end-to-end time to score one 1 mm scan with
``brain_mri.yaml`` + ``register_to=mni152`` with and without ``deformable`` (warm process). Times
are wall clock, medians over repeats, with the machine's load recorded (other jobs share its 2
cores). Results: ``deformable.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_registration import make_cases  # noqa: E402

from anomaly3d_core.preprocess import registration as reg  # noqa: E402


def timed(fn, repeats: int) -> tuple[object, list[float], list[float]]:
    """Result, wall seconds and CPU seconds of this process (``time.process_time``) per repeat.

    On a loaded machine the CPU time is the better figure for single-threaded work (the
    registration runs on one SimpleITK thread; run with ``OMP_NUM_THREADS=1`` for torch): it is
    what the wall time would be on an idle core.
    """
    result, wall, cpu = None, [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return result, wall, cpu


def _z(array: np.ndarray, brain: np.ndarray) -> np.ndarray:
    values = array[brain]
    return (array - values.mean()) / (values.std() or 1.0)


def per_scan(cases: list[dict], repeats: int) -> list[dict]:
    tpl = reg.template("mni152")
    target = _z(tpl.volume.array, tpl.brain)
    rows = []
    for case in cases:
        row: dict = {"name": case["name"]}
        for deformable in (False, True):
            fit, times, cpu = timed(
                lambda c=case, d=deformable: reg.register(c["volume"], "mni152", deformable=d), repeats
            )
            key = "deformable" if deformable else "affine"
            row[key] = {
                "seconds": round(statistics.median(times), 2),
                "cpu_seconds": round(statistics.median(cpu), 2),
                "intensity_error": round(
                    float(np.abs(_z(fit.array, tpl.brain) - target)[tpl.brain].mean()), 4
                ),
                "dice": fit.dice,
                "metric": fit.metric,
                "displacement_mm": fit.displacement_mm,
            }
        print(row, flush=True)
        rows.append(row)
    return rows


def end_to_end(scan, repeats: int, work: Path) -> dict:
    """Seconds to score one 1 mm scan (load, register, score, map back), affine only and with the deformable step."""
    from anomaly3d_core.config import load_config
    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.io.files import list_inputs, save_nifti
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    make_demo_dataset(work / "data", seed=11, n_train=6, n_test_normal=0, n_test_anomalous=0)
    path = str(save_nifti(np.asarray(scan.array), scan.affine, work / "scan_1mm.nii.gz"))
    out = {}
    for deformable in (False, True):
        overrides = [
            "tracking.enabled=false",
            "data.cache=false",
            "data.preprocessing.register_to=mni152",
            f"data.preprocessing.deformable={str(deformable).lower()}",
            "training.num_epochs=3",
        ]
        config = load_config(HERE / "configs" / "brain_mri.yaml", overrides)
        pipe = AnomalyDetectionPipeline(config).fit(list_inputs(work / "data" / "train"), show_progress=False)
        pipe.score(path)  # warm
        _, times, cpu = timed(lambda p=pipe: p.score(path), repeats)
        out["deformable" if deformable else "affine"] = {
            "median_seconds": round(statistics.median(times), 2),
            "median_cpu_seconds": round(statistics.median(cpu), 2),
            "all_seconds": [round(t, 2) for t in times],
        }
        print(out, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--cases", type=int, default=2, help="subjects per affine range")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cases = [c for c in make_cases(args.cases) if c["name"].startswith("subject")]
    rows = per_scan(cases, args.repeats)
    with tempfile.TemporaryDirectory() as work:
        e2e = end_to_end(cases[0]["volume"], args.repeats, Path(work))
    summary = {
        key: {
            "median_seconds": statistics.median(r[key]["seconds"] for r in rows),
            "median_cpu_seconds": statistics.median(r[key]["cpu_seconds"] for r in rows),
            "mean_intensity_error": round(statistics.mean(r[key]["intensity_error"] for r in rows), 4),
            "mean_dice": round(statistics.mean(r[key]["dice"] for r in rows), 4),
        }
        for key in ("affine", "deformable")
    }
    result = {
        "scans": rows,
        "summary": summary,
        "end_to_end": e2e,
        "threads": reg.registration_threads(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deformable.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2), json.dumps(e2e), flush=True)


if __name__ == "__main__":
    main()
