"""The multi-sequence benchmark: the same subjects scored from T1w alone and from T1w with FLAIR (and T2w).

    python experiments/benchmark_multiseq.py [--space template|native] [--data DIR] [--out DIR] [--only NAME ...]

Data: ``bench_data.make_benchmark_data(DIR, sequences=("T1w", "T2w", "FLAIR"), space=...)`` with
fixed seeds (default DIR ``bench_output/data/multiseq`` or ``multiseq_native``), written as BIDS:
16 training normals; a tuning set (``tumour`` and ``infarct`` only, not used here: the presets
were fixed before this benchmark); a test set of 8 normals and 16 lesioned subjects with four
lesion kinds. In native space every sequence has its own grid (FLAIR with 3-4 mm slices) and the
head moves slightly between sequences.

Every row trains with one preset and the same budget; only ``data.sequences`` differs between the
rows of a preset. Template space: ``brain_mri.yaml``. Native space: both routes, the native preset
``brain_mri_native.yaml`` (no registration; scan and depth normalisation) and ``brain_mri.yaml``
(affine registration to MNI152, normative scoring); "tuning-set AP" (pooled voxel AP on the
tuning split: ``tumour`` and ``infarct`` only) is the figure a route is chosen by, never the test
set. Score maps lie on each subject's T1w grid, where the ground truth is. Voxel metrics are
pooled over the T1w brain voxels of all test subjects; "lesion sens." is the fraction of
ground-truth lesions (connected components) that the model's own decision mask touches, for all
kinds and for the small MS-like lesions; "held-out AP" pools the ``ms`` and ``haemorrhage``
subjects with the normals. Results: ``benchmark_multiseq[_native].json`` and ``.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tracking  # noqa: E402
from bench_data import HELD_OUT_KINDS, make_benchmark_data  # noqa: E402
from bench_results import merge_rows  # noqa: E402
from benchmark_native import config_tree, metrics, read_scan  # noqa: E402

SEQUENCES = ("T1w", "T2w", "FLAIR")
PRESETS = {
    "brain_mri.yaml": HERE / "configs" / "brain_mri.yaml",
    "brain_mri_native.yaml": HERE / "configs" / "brain_mri_native.yaml",
    "brain_mri_synthetic.yaml": HERE / "configs" / "brain_mri_synthetic.yaml",
}
SETS = {"T1w alone": ["T1w"], "T1w + FLAIR": ["T1w", "FLAIR"], "T1w + T2w + FLAIR": ["T1w", "T2w", "FLAIR"]}
#: rows per space: (sequence set, preset). In native space both routes run: the native preset (no
#: registration) and brain_mri.yaml (registration to MNI152, normative); the tuning set says which.
SPACE_PRESETS = {
    "template": ["brain_mri.yaml"],
    "native": ["brain_mri_native.yaml", "brain_mri.yaml", "brain_mri_synthetic.yaml"],
}


def entries(space: str) -> dict[str, tuple[list[str], str]]:
    """Row name -> (sequences, preset) for ``space``."""
    presets = SPACE_PRESETS[space]
    return {
        (f"{name}, {preset}" if len(presets) > 1 else name): (seqs, preset)
        for preset in presets
        for name, seqs in SETS.items()
    }


def lesion_sensitivity(truths: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """Fraction of ground-truth lesions (26-connected components) touched by the predicted mask."""
    from anomaly3d_core.evaluation.metrics import lesion_detection

    tp = fn = 0
    for t, p in zip(truths, preds, strict=True):
        if t.any():
            found = lesion_detection(t, p)
            tp, fn = tp + found["tp"], fn + found["fn"]
    return tp / (tp + fn) if tp + fn else float("nan")


def score_split(pipe: Any, data: Path, split: str) -> dict[str, list]:
    """Foreground truths and scores, volume scores, decision masks, kinds and seconds of a split's subjects."""
    from anomaly3d_core.io.data import list_items

    kinds = {r["subject"]: r["lesion_kind"] for r in csv.DictReader(open(data / f"{split}_manifest.csv"))}
    out: dict[str, list] = {k: [] for k in ("truths", "scores", "vscores", "preds", "kinds", "seconds")}
    for subject in list_items(data / split, pipe.channels).items:
        t0 = time.perf_counter()
        result = pipe.score(subject)
        out["seconds"].append(time.perf_counter() - t0)
        image, _ = read_scan(Path(subject.files["T1w"]))
        mask, _ = read_scan(data / f"{split}_masks" / f"{subject.stem}.nii.gz")
        if result.score_map.shape != image.shape:
            raise RuntimeError(
                f"{subject}: score map {result.score_map.shape} is not on the T1w grid {image.shape}"
            )
        fg = image != 0
        out["truths"].append(mask[fg] > 0)
        out["scores"].append(result.score_map[fg])
        out["vscores"].append(float(result.volume_score))
        out["preds"].append((mask > 0, result.mask & fg))
        out["kinds"].append(kinds.get(subject.stem, kinds.get(subject.subject, "")))
    return out


def synthetic_config(path: Path, sequences: list[str]) -> Any:
    """A synthetic-detector preset for ``sequences``; tracking and the cache off."""
    from anomaly3d_core.persistence import load_any_config

    return load_any_config(
        path, ["tracking.enabled=false", "data.cache=false", f"data.sequences=[{','.join(sequences)}]"]
    )


def run_one(name: str, data: Path, space: str) -> dict[str, Any]:
    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.persistence import build_detector
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    sequences, preset = entries(space)[name]
    if "synthetic" in preset:  # a detector config with a top-level 'synthetic' section
        pipe = build_detector(synthetic_config(PRESETS[preset], sequences))
    else:
        pipe = AnomalyDetectionPipeline(config_tree(PRESETS[preset], {"data.sequences": sequences}))
    train = list_items(data / "train", pipe.channels).items
    t0 = time.perf_counter()
    pipe.fit(train, show_progress=False)
    fit_s = time.perf_counter() - t0
    tune = score_split(pipe, data, "tune")
    test = score_split(pipe, data, "test")
    kinds = test["kinds"]
    held = [i for i, k in enumerate(kinds) if k in HELD_OUT_KINDS or not k]
    ms = [i for i, k in enumerate(kinds) if k == "ms"]
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    preds = test["preds"]
    return {
        "name": name,
        "sequences": sequences,
        "preset": preset,
        "fit_seconds": round(fit_s, 1),
        "seconds_per_subject": round(float(np.median(test["seconds"])), 3),
        "tune": metrics(tune["truths"], tune["scores"], tune["vscores"], full=False),
        "all": metrics(test["truths"], test["scores"], test["vscores"]),
        "held_out_kinds": metrics(
            *(pick(test[k], held) for k in ("truths", "scores", "vscores")), full=False
        ),
        "lesion_sensitivity": lesion_sensitivity([p[0] for p in preds], [p[1] for p in preds]),
        "ms_lesion_sensitivity": lesion_sensitivity(*zip(*pick(preds, ms), strict=True))
        if ms
        else float("nan"),
        "n_test": len(kinds),
        "n_ms": len(ms),
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| sequences | tuning-set AP | voxel AP (pooled) | best Dice | sample AUROC | held-out AP | lesion sens. (all) "
        "| lesion sens. (MS) | fit (s) | s / subject |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        a = r["all"]
        tune = r.get("tune", {}).get("pixel_ap", float("nan"))
        lines.append(
            f"| {r['name']} | {tune:.3f} | {a['pixel_ap']:.3f} | {a['pixel_best_dice']:.3f} | {a['volume_auroc']:.3f} "
            f"| {r['held_out_kinds']['pixel_ap']:.3f} | {r['lesion_sensitivity']:.3f} "
            f"| {r['ms_lesion_sensitivity']:.3f} | {r['fit_seconds']:.0f} | {r['seconds_per_subject']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--space", choices=tuple(SPACE_PRESETS), default="template")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", help="entry names (substring match)")
    bench_tracking.add_arguments(parser)
    args = parser.parse_args()
    data = args.data or Path("bench_output/data") / (
        "multiseq" if args.space == "template" else "multiseq_native"
    )
    print(
        f"multi-sequence benchmark data in {make_benchmark_data(data, space=args.space, sequences=SEQUENCES)}"
    )
    rows = entries(args.space)
    names = [n for n in rows if not args.only or any(o in n for o in args.only)]
    results = []
    for name in names:
        print(f"-- {name}", flush=True)
        results.append(run_one(name, data, args.space))
        r = results[-1]
        print(
            f"   voxel AP {r['all']['pixel_ap']:.3f}, sample AUROC {r['all']['volume_auroc']:.3f}, MS lesion "
            f"sensitivity {r['ms_lesion_sensitivity']:.3f}, fit {r['fit_seconds']} s, "
            f"{r['seconds_per_subject']} s/subject",
            flush=True,
        )
    suffix = "" if args.space == "template" else "_native"
    args.out.mkdir(parents=True, exist_ok=True)
    fresh_rows = list(results)
    previous = args.out / f"benchmark_multiseq{suffix}.json"
    if args.only:  # a partial rerun updates its rows and keeps the others
        results = merge_rows(previous, results, rows)
    text = table(results)
    previous.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"benchmark_multiseq{suffix}.md").write_text(text + "\n")
    print("\n" + text)
    if not args.no_mlflow:
        from anomaly3d_core.config import build_config

        configs = {
            r["name"]: (
                synthetic_config(PRESETS[r["preset"]], r["sequences"])
                if "synthetic" in r["preset"]
                else build_config(config_tree(PRESETS[r["preset"]], {"data.sequences": r["sequences"]})),
                r["preset"],
            )
            for r in fresh_rows
        }
        bench_tracking.log_rows(fresh_rows, configs, data, args.experiment, f"benchmark_multiseq{suffix}")
        print(f"\n{len(fresh_rows)} row(s) logged to the MLflow experiment '{args.experiment}'")


if __name__ == "__main__":
    main()
