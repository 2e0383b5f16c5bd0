"""The native-space benchmark: scans as a multi-site study acquires them, each on its own grid.

    python experiments/benchmark_native.py [--data DIR] [--out DIR] [--only NAME ...] [--validation-only]

Data: ``bench_data.make_benchmark_data(DIR, space="native")`` with fixed seeds (default DIR
``bench_output/data/native``): 16 training normals; a tuning set with only ``tumour`` and
``infarct``; a test set of 8 normals and 16 lesioned subjects with four lesion kinds. Each scan has
its own head pose, voxel size (1-2 mm, some thick-slice), axis order, field of view and intensity
units (``anomaly3d_core.demo.native``). Every method scores each test scan on its own native grid.

Rows: the native preset (no registration), the template preset with affine registration to
MNI152 (the normative route), and the intensity baseline |I - median| / MAD. Voxel metrics are
pooled over the brain voxels (nonzero) of all test scans on their native grids, so a 1 mm scan
weighs up to 8x a 2 mm one; "voxel AP (mm³)" weights each voxel by its volume instead. "per-scan
AP" is the mean over lesioned scans of each scan's own voxel AP: the gap between it and the
pooled AP measures how comparable score scales are across scans. "held-out kinds" pools the ``ms``
and ``haemorrhage`` subjects with the normals. Fit times are cold (no preprocessing cache, so
registration is included). Results: ``benchmark_native.json`` and ``benchmark_native.md`` in
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tracking  # noqa: E402
from bench_data import HELD_OUT_KINDS, make_benchmark_data  # noqa: E402
from bench_results import add_validation_only, merge_rows, previous_row, rows_to_validate  # noqa: E402
from bench_validation import size_cells, spearman_lines, validate  # noqa: E402

NATIVE_CONFIG = HERE / "configs" / "brain_mri_native.yaml"
TEMPLATE_CONFIG = HERE / "configs" / "brain_mri.yaml"
SYNTHETIC_CONFIG = HERE / "configs" / "brain_mri_synthetic.yaml"
NATIVE_ENSEMBLE_CONFIG = HERE / "configs" / "brain_mri_native_ensemble.yaml"
ENTRIES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "native preset (brain_mri_native.yaml)": ("pipeline", NATIVE_CONFIG, {}),
    "native preset without score normalisation (round 1)": (
        "pipeline",
        NATIVE_CONFIG,
        {"threshold.scan_normalization": "none", "threshold.depth_normalization": False},
    ),
    "registered: brain_mri.yaml (register_to: auto, normative)": ("pipeline", TEMPLATE_CONFIG, {}),
    "brain_mri.yaml with scan and depth normalisation": (
        "pipeline",
        TEMPLATE_CONFIG,
        {"threshold.scan_normalization": "robust", "threshold.depth_normalization": True},
    ),
    "native preset, T1w dark (residual_sign: dark)": (
        "pipeline",
        NATIVE_CONFIG,
        {"patches.residual_sign": "dark"},
    ),
    "brain_mri.yaml, T1w dark (residual_sign: dark)": (
        "pipeline",
        TEMPLATE_CONFIG,
        {"patches.residual_sign": "dark"},
    ),
    "brain_mri.yaml + deformable step": (
        "pipeline",
        TEMPLATE_CONFIG,
        {"data.preprocessing.deformable": True},
    ),
    "baseline: intensity MAD z-score": ("baseline", "intensity_mad", {}),
    "synthetic anomalies, U-Net (brain_mri_synthetic.yaml)": ("detector", SYNTHETIC_CONFIG, {}),
    "ensemble: native preset + synthetic anomalies (brain_mri_native_ensemble.yaml)": (
        "detector",
        NATIVE_ENSEMBLE_CONFIG,
        {},
    ),
}


# ---------------------------------------------------------------------------------- helpers
def config_tree(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A preset YAML as a dict with ``--set``-style dotted ``overrides``; tracking and the cache off."""
    import yaml

    tree = yaml.safe_load(Path(path).read_text()) or {}
    settings = {"tracking.enabled": False, "data.cache": False, **(overrides or {})}
    for dotted, value in settings.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = copy.deepcopy(value)
    return tree


def read_scan(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array (float32, native grid) and affine of a NIfTI file."""
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def split_files(data: Path, split: str) -> tuple[list[Path], dict[str, str]]:
    """Scans of ``split`` (``tune`` or ``test``) and their lesion kinds ('' for normals)."""
    rows = list(csv.DictReader(open(data / f"{split}_manifest.csv")))
    kinds = {Path(r["file"]).name: r["lesion_kind"] for r in rows}
    return sorted((data / split).glob("*.nii.gz")), kinds


def per_scan_ap(truths: list[np.ndarray], scores: list[np.ndarray]) -> float:
    """Mean over scans with lesion voxels of each scan's own voxel AP (inputs: foreground voxels)."""
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(t, s) for t, s in zip(truths, scores, strict=True) if 0 < t.sum() < t.size]
    return float(np.mean(aps)) if aps else float("nan")


def metrics(
    truths: list[np.ndarray],
    scores: list[np.ndarray],
    vscores: list[float],
    voxel_mm3: list[float] | None = None,
    full: bool = True,
) -> dict[str, float]:
    """Pooled voxel AP/AUROC/best Dice, sample AUROC and per-scan AP; inputs are foreground voxels.

    ``full=False`` computes only pooled AP, sample AUROC and per-scan AP (fast, for sweeps).
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    y = np.concatenate(truths)
    s = np.concatenate(scores).astype(np.float64)
    labels = [int(t.any()) for t in truths]
    out = {
        "pixel_ap": float(average_precision_score(y, s)),
        "volume_auroc": float(roc_auc_score(labels, vscores))
        if 0 < sum(labels) < len(labels)
        else float("nan"),
        "per_scan_ap": per_scan_ap(truths, scores),
    }
    if full:
        out["pixel_auc"] = float(roc_auc_score(y, s))
        precision, recall, _ = precision_recall_curve(y, s)
        out["pixel_best_dice"] = float(
            np.nanmax(2 * precision * recall / np.maximum(precision + recall, 1e-12))
        )
        if voxel_mm3 is not None:
            w = np.concatenate(
                [np.full(t.size, v, np.float32) for t, v in zip(truths, voxel_mm3, strict=True)]
            )
            out["pixel_ap_mm3"] = float(average_precision_score(y, s, sample_weight=w))
    return out


def top_fraction_mean(values: np.ndarray, fraction: float = 0.01) -> float:
    """Mean of the top ``fraction`` of ``values`` (the pipeline's default volume score)."""
    k = max(1, int(round(values.size * fraction)))
    return float(np.partition(values, values.size - k)[-k:].mean())


# ---------------------------------------------------------------------------------- methods
def make_method(entry: tuple[str, Any, dict[str, Any]]) -> tuple[Callable, Callable]:
    """``fit(train_paths) -> model`` and ``score(model, path or Volume) -> (native map, volume score, mask)``."""
    kind, spec, overrides = entry
    if kind == "pipeline":
        from anomaly3d_core.pipeline import AnomalyDetectionPipeline

        def fit(items: list) -> Any:
            return AnomalyDetectionPipeline(config_tree(spec, overrides)).fit(list(items))

        def score(pipe: Any, item: Any) -> tuple[np.ndarray, float, np.ndarray]:
            r = pipe.score(item)
            return np.asarray(r.score_map, np.float32), float(r.volume_score), r.mask

        return fit, score
    if kind == "detector":  # any detector config (e.g. a top-level 'synthetic' section)
        from anomaly3d_core.persistence import build_detector, load_any_config

        def fit_detector(items: list) -> Any:
            sets = [
                f"{k}={v}" for k, v in {"tracking.enabled": False, "data.cache": False, **overrides}.items()
            ]
            return build_detector(load_any_config(spec, sets)).fit(list(items))

        def score_detector(detector: Any, item: Any) -> tuple[np.ndarray, float, np.ndarray]:
            r = detector.score(item)
            return np.asarray(r.score_map, np.float32), float(r.volume_score), r.mask

        return fit_detector, score_detector
    import baselines

    from anomaly3d_core.io.volume import Volume

    as_vol = lambda x: x if isinstance(x, Volume) else Volume(*read_scan(x))  # noqa: E731

    def fit_baseline(items: list) -> Any:
        return {"intensity_mad": baselines.IntensityMAD}[spec]().fit([as_vol(p) for p in items])

    def score_baseline(model: Any, item: Any) -> tuple[np.ndarray, float, np.ndarray]:
        v = as_vol(item)
        s, vs = model.score(v)
        return s, float(vs), (s > model.threshold_) & (v.array != 0)

    return fit_baseline, score_baseline


def score_split(model: Any, score: Callable, data: Path, split: str) -> dict[str, list]:
    """Foreground truths and scores per scan, volume scores, decision masks, voxel volumes, kinds and seconds."""
    paths, kinds = split_files(data, split)
    out: dict[str, list] = {
        k: [] for k in ("truths", "scores", "vscores", "preds", "mm3", "kinds", "seconds")
    }
    for path in paths:
        t0 = time.perf_counter()
        smap, vs, decided = score(model, path)
        out["seconds"].append(time.perf_counter() - t0)
        image, affine = read_scan(path)
        mask, _ = read_scan(data / f"{split}_masks" / path.name)
        if smap.shape != image.shape:
            raise RuntimeError(f"{path.name}: score map {smap.shape} is not on the scan's grid {image.shape}")
        fg = image != 0
        out["truths"].append(mask[fg] > 0)
        out["scores"].append(smap[fg])
        out["vscores"].append(vs)
        out["preds"].append((mask > 0, decided & fg))
        out["mm3"].append(float(abs(np.linalg.det(affine[:3, :3]))))
        out["kinds"].append(kinds.get(path.name, ""))
    return out


def run_one(name: str, data: Path, validation: bool = True) -> dict[str, Any]:
    from anomaly3d_core.evaluation.validation import size_sensitivity

    fit, score = make_method(ENTRIES[name])
    train = sorted((data / "train").glob("*.nii.gz"))
    t0 = time.perf_counter()
    model = fit(train)
    fit_s = time.perf_counter() - t0
    test = score_split(model, score, data, "test")
    tune = score_split(model, score, data, "tune")
    held = [i for i, k in enumerate(test["kinds"]) if k in HELD_OUT_KINDS or not k]
    pick = lambda key: [test[key][i] for i in held]  # noqa: E731
    preds = test["preds"]
    row = {
        "name": name,
        "fit_seconds": round(fit_s, 1),
        "seconds_per_scan": round(float(np.median(test["seconds"])), 3),
        "tune": metrics(tune["truths"], tune["scores"], tune["vscores"], full=False),
        "all": metrics(test["truths"], test["scores"], test["vscores"], test["mm3"]),
        "held_out_kinds": metrics(pick("truths"), pick("scores"), pick("vscores"), full=False),
        "size_sensitivity": size_sensitivity([p[0] for p in preds], [p[1] for p in preds], test["mm3"]),
    }
    if validation:
        row["validation"] = validation_figures(name, data)
    return row


def validation_figures(name: str, data: Path) -> dict[str, float]:
    """The row's cross-fitted validation figures over the training normals (no test scan)."""
    fit, score = make_method(ENTRIES[name])
    return validate(fit, lambda m, item: score(m, item)[:2], sorted((data / "train").glob("*.nii.gz")))


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| method | validation AP | tuning-set AP | voxel AP (pooled) | voxel AUROC (pooled) | best Dice | sample AUROC "
        "| AP held-out kinds | per-scan AP (mean) | voxel AP (mm³) | sens. < 0.5 cm³ | sens. 0.5-5 cm³ "
        "| sens. > 5 cm³ | fit (s) | s / scan |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        a, h = r["all"], r["held_out_kinds"]
        val = r.get("validation", {}).get("pixel_ap", float("nan"))
        tune = r.get("tune", {}).get("pixel_ap", float("nan"))
        lines.append(
            f"| {r['name']} | {val:.3f} | {tune:.3f} | {a['pixel_ap']:.3f} | {a['pixel_auc']:.3f} "
            f"| {a['pixel_best_dice']:.3f} | {a['volume_auroc']:.3f} | {h['pixel_ap']:.3f} | {a['per_scan_ap']:.3f} "
            f"| {a.get('pixel_ap_mm3', float('nan')):.3f} | {size_cells(r)} | {r['fit_seconds']:.0f} "
            f"| {r['seconds_per_scan']:.2f} |"
        )
    lines += ["", *spearman_lines(results, lambda r: r["all"]["pixel_ap"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/native"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", help="entry names (substring match)")
    parser.add_argument(
        "--no-validation", action="store_true", help="skip the cross-fitted validation column"
    )
    add_validation_only(parser)
    bench_tracking.add_arguments(parser)
    args = parser.parse_args()
    print(f"native benchmark data in {make_benchmark_data(args.data, space='native')}", flush=True)
    names = [n for n in ENTRIES if not args.only or any(o in n for o in args.only)]
    previous = args.out / "benchmark_native.json"
    names = rows_to_validate(args, previous, names)
    results = []
    for name in names:
        print(f"-- {name}", flush=True)
        if args.validation_only:
            results.append(
                {**previous_row(previous, name), "validation": validation_figures(name, args.data)}
            )
        else:
            results.append(run_one(name, args.data, not args.no_validation))
        r = results[-1]
        print(
            f"   validation AP {r.get('validation', {}).get('pixel_ap', float('nan')):.3f}, "
            f"voxel AP {r['all']['pixel_ap']:.3f}, sample AUROC {r['all']['volume_auroc']:.3f}, "
            f"per-scan AP {r['all']['per_scan_ap']:.3f}, fit {r['fit_seconds']} s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    fresh_rows = list(results)
    if args.only or args.validation_only:  # a partial rerun updates its rows and keeps the others
        results = merge_rows(previous, results, ENTRIES)
    text = table(results)
    previous.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "benchmark_native.md").write_text(text + "\n")
    print("\n" + text)
    if not args.no_mlflow:
        configs = {r["name"]: entry_config(ENTRIES[r["name"]]) for r in fresh_rows if r["name"] in ENTRIES}
        configs = {k: v for k, v in configs.items() if v is not None}
        bench_tracking.log_rows(fresh_rows, configs, args.data, args.experiment, "benchmark_native")
        print(f"\n{len(fresh_rows)} row(s) logged to the MLflow experiment '{args.experiment}'")


def entry_config(entry: tuple[str, Any, dict[str, Any]]) -> tuple[Any, str] | None:
    """``(config, config file name)`` of a pipeline entry; ``None`` for a baseline."""
    from anomaly3d_core.config import build_config

    kind, spec, overrides = entry
    if kind == "detector":
        from anomaly3d_core.persistence import load_any_config

        return load_any_config(spec, [f"{k}={v}" for k, v in overrides.items()]), Path(spec).name
    return (build_config(config_tree(spec, overrides)), Path(spec).name) if kind == "pipeline" else None


if __name__ == "__main__":
    main()
