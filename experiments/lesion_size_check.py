"""Per-lesion-size sensitivity, fit and scoring time and peak memory of native-benchmark routes.

    python experiments/lesion_size_check.py [--data DIR] [--out DIR] --only NAME [NAME ...]

Fits each chosen ``benchmark_native.ENTRIES`` route (substring match; baselines have no decision
mask and are skipped) on the native benchmark's 16 training normals, in a process of its own, and
scores the test set on each scan's native grid. Each connected lesion (26-connectivity) of the
ground truth is one lesion; its volume in cm³ comes from its scan's voxel size. A lesion counts as
found when the route's own decision mask (calibrated on held-out normals, post-processing
included) touches it. Sensitivity is reported per size band (< 0.5 cm³, 0.5-5, > 5), next to the
voxels flagged in normal scans (false-positive cm³ per normal scan), the pooled voxel AP, fit
seconds (wall and CPU), median seconds per scan and the process's peak RSS. Results:
``lesion_size.json`` and ``lesion_size.md`` in ``--out`` (a rerun replaces the rows it ran); the
route's ``benchmark_native.py`` row, computed the same way from the same fit, is merged into
``benchmark_native.json``/``.md`` (so one fit gives both).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_data import HELD_OUT_KINDS, make_benchmark_data  # noqa: E402
from bench_results import merge_rows  # noqa: E402
from benchmark_native import ENTRIES, metrics, read_scan, split_files  # noqa: E402
from benchmark_native import table as native_table  # noqa: E402

BANDS = ((0.0, 0.5, "< 0.5 cm³"), (0.5, 5.0, "0.5-5 cm³"), (5.0, float("inf"), "> 5 cm³"))


def lesion_hits(truth: np.ndarray, pred: np.ndarray, voxel_mm3: float) -> list[tuple[float, bool]]:
    """``(volume cm³, found)`` of every connected lesion of ``truth``."""
    from scipy import ndimage

    labels, n = ndimage.label(truth, structure=np.ones((3, 3, 3)))
    if n == 0:
        return []
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    found = ndimage.maximum(pred.astype(np.uint8), labels, index=np.arange(1, n + 1))
    return [(float(s) * voxel_mm3 / 1000.0, bool(f)) for s, f in zip(sizes, found, strict=True)]


def run_one(name: str, data: Path) -> dict[str, Any]:
    """Fit and score one route in this process."""
    import torch
    from benchmark_native import config_tree

    from anomaly3d_core.persistence import build_detector, load_any_config
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    torch.set_num_threads(1)
    kind, spec, overrides = ENTRIES[name]
    train = sorted((data / "train").glob("*.nii.gz"))
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "detector":
        sets = [f"{k}={v}" for k, v in {"tracking.enabled": False, "data.cache": False, **overrides}.items()]
        det = build_detector(load_any_config(spec, sets))
    else:
        det = AnomalyDetectionPipeline(config_tree(spec, overrides))
    det.fit(train)
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    paths, kinds = split_files(data, "test")
    hits: list[tuple[float, bool]] = []
    truths, scores, vscores, seconds, fp_cm3, mm3s, names = [], [], [], [], [], [], []
    for path in paths:
        t1 = time.perf_counter()
        r = det.score(path)
        seconds.append(time.perf_counter() - t1)
        image, affine = read_scan(path)
        truth = read_scan(data / "test_masks" / path.name)[0] > 0
        mm3 = float(abs(np.linalg.det(affine[:3, :3])))
        fg = image != 0
        truths.append(truth[fg])
        scores.append(np.asarray(r.score_map)[fg])
        vscores.append(r.volume_score)
        mm3s.append(mm3)
        names.append(kinds.get(path.name, ""))
        if truth.any():
            hits += lesion_hits(truth, np.asarray(r.mask), mm3)
        else:
            fp_cm3.append(float(np.asarray(r.mask).sum()) * mm3 / 1000.0)
    bands = {}
    for lo, hi, label in BANDS:
        found = [f for v, f in hits if lo <= v < hi]
        bands[label] = {
            "lesions": len(found),
            "sensitivity": float(np.mean(found)) if found else float("nan"),
        }
    held = [i for i, k in enumerate(names) if k in HELD_OUT_KINDS or not k]
    pick = lambda xs: [xs[i] for i in held]  # noqa: E731
    native_row = {  # the row benchmark_native.py writes for this route, from the same fit
        "name": name,
        "fit_seconds": round(fit_s, 1),
        "seconds_per_scan": round(float(np.median(seconds)), 3),
        "all": metrics(truths, scores, vscores, mm3s),
        "held_out_kinds": metrics(pick(truths), pick(scores), pick(vscores), full=False),
    }
    return {
        "name": name,
        "native_row": native_row,
        "sensitivity": bands,
        "false_positive_cm3_per_normal": round(float(np.mean(fp_cm3)), 2) if fp_cm3 else float("nan"),
        "all": native_row["all"],
        "fit_seconds": round(fit_s, 1),
        "fit_cpu_seconds": round(fit_cpu, 1),
        "seconds_per_scan": round(float(np.median(seconds)), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def table(rows: list[dict[str, Any]]) -> str:
    labels = [b[2] for b in BANDS]
    head = (
        "| route | "
        + " | ".join(f"sens. {lab} (n)" for lab in labels)
        + " | FP cm³ / normal | voxel AP | best Dice | sample AUROC | fit (s) | s / scan | peak RSS (MiB) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sens = " | ".join(
            f"{r['sensitivity'][lab]['sensitivity']:.2f} ({r['sensitivity'][lab]['lesions']})"
            for lab in labels
        )
        a = r["all"]
        lines.append(
            f"| {r['name']} | {sens} | {r['false_positive_cm3_per_normal']:.2f} | {a['pixel_ap']:.3f} "
            f"| {a['pixel_best_dice']:.3f} | {a['volume_auroc']:.3f} | {r['fit_seconds']:.0f} "
            f"| {r['seconds_per_scan']:.2f} | {r['peak_rss_mib']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/native"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="+", default=[], help="route names (substring match; required)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.result_file.write_text(json.dumps(run_one(args.one, args.data)))
        return
    if not args.only:
        parser.error("--only NAME: name the routes to run (substring of a benchmark_native.py entry)")
    make_benchmark_data(args.data, space="native")
    names = [n for n, e in ENTRIES.items() if e[0] != "baseline" and any(o in n for o in args.only)]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "lesion_size.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    for name in names:
        print(f"-- {name}", flush=True)
        tmp = args.out / ".lesion_size_one.json"
        cmd = [sys.executable, __file__, "--one", name, "--data", str(args.data), "--result-file", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"   failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = json.loads(tmp.read_text())
        tmp.unlink()
        rows = [r for r in rows if r["name"] != name] + [row]
        print(table([row]), flush=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    fresh = [r["native_row"] for r in rows if r["name"] in names]
    native = args.out / "benchmark_native.json"
    if fresh:  # the same rows benchmark_native.py --only NAME would write
        merged = merge_rows(native, fresh, ENTRIES)
        native.write_text(json.dumps(merged, indent=2) + "\n")
        (args.out / "benchmark_native.md").write_text(native_table(merged) + "\n")
    (args.out / "lesion_size.md").write_text(table(rows) + "\n")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
