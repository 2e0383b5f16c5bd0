"""The demo benchmark: the brain preset against the seed's configuration families, an ensemble and
two baselines, on accuracy and speed. Every figure in README's benchmark table comes from here.

    make bench            # or: python experiments/benchmark.py [--data DIR] [--out DIR] [--only NAME ...]
                          #     [--no-validation | --validation-only]

Data: ``bench_data.make_benchmark_data`` with fixed seeds (16 training normals; a test set of 8
normals and 16 lesioned subjects, four lesion kinds). ``ms`` and ``haemorrhage`` were held out of
tuning the preset and get their own columns. Each entry runs in its own process so its peak RSS
is its own. Results: ``benchmark.json`` and ``benchmark.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
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


def family(extractor: str, autoencoder: str) -> dict[str, Any]:
    """A seed configuration family: CNN features pooled per patch into an autoencoder."""
    return {
        "extractor": {"type": extractor, "layers": ["layer1", "layer2"]},
        "embedding": {"embedding_method": "adaptive", "adaptive_size": 2},
        "autoencoder": {"type": autoencoder},
        "patches": {"patch_size": 8, "stride": 4, "score_mode": "patch"},
    }


ENTRIES: dict[str, Any] = {
    "preset (brain_mri.yaml)": HERE / "configs" / "brain_mri.yaml",
    "native preset (brain_mri_native.yaml)": HERE / "configs" / "brain_mri_native.yaml",
    "preset, T1w dark (residual_sign: dark)": (
        HERE / "configs" / "brain_mri.yaml",
        ["patches.residual_sign=dark"],
    ),
    **{
        f"{e}+{a}": family(e, a)
        for e in ("simple", "resnet18")
        for a in ("standard", "variational", "denoising", "contractive")
    },
    "ensemble (brain_ensemble.yaml)": HERE / "configs" / "brain_ensemble.yaml",
    "multi-scale (brain_mri_multiscale.yaml)": HERE / "configs" / "brain_mri_multiscale.yaml",
    # the default-weights question: the same family with a self-supervised pretrained extractor
    "simple (pretrained)+standard": {
        **family("simple", "standard"),
        "extractor": {"type": "simple", "layers": ["layer1", "layer2"], "pretrain_epochs": 20},
    },
    "simple (pretrained)+denoising": {
        **family("simple", "denoising"),
        "extractor": {"type": "simple", "layers": ["layer1", "layer2"], "pretrain_epochs": 20},
    },
    "synthetic anomalies, U-Net (brain_mri_synthetic.yaml)": HERE / "configs" / "brain_mri_synthetic.yaml",
    "baseline: atlas z-score": "atlas_zscore",
    "baseline: intensity MAD z-score": "intensity_mad",
}
try:
    import monai_baseline

    if monai_baseline.available():
        ENTRIES["MONAI AutoEncoder, sliding window"] = "monai_autoencoder"
except ImportError:
    pass


def _metrics(truths, maps, fgs, vscores, preds, threshold, vthreshold=None) -> dict[str, float]:
    from anomaly3d_core.evaluation.metrics import comprehensive_evaluation

    m = comprehensive_evaluation(
        truths,
        maps,
        threshold,
        predicted_masks=preds,
        foreground_masks=fgs,
        volume_scores=vscores,
        volume_threshold=vthreshold,
        n_bootstrap=200,
    )
    keys = ("pixel_ap", "pixel_auc", "pixel_best_dice", "pixel_dice", "volume_auroc", "pixel_ap_ci")
    return {k: m[k] for k in keys if k in m}


def make_method(entry: Any) -> tuple[Callable[[list], Any], Callable[[Any, Any], tuple]]:
    """``fit(train paths) -> model`` and ``score(model, path or Volume) -> (map, foreground, volume score,
    mask, threshold, volume threshold)`` of an entry: a baseline name, a config file (optionally with
    ``--set`` overrides: ``(path, [key=value, ...])``) or a config dict."""
    from anomaly3d_core.io.files import load_volume
    from anomaly3d_core.io.volume import Volume

    as_vol = lambda x: x if isinstance(x, Volume) else load_volume(x)  # noqa: E731
    if isinstance(entry, str):
        import baselines
        import monai_baseline

        def fit_baseline(items: list) -> Any:
            model = {
                "atlas_zscore": baselines.AtlasZScore,
                "intensity_mad": baselines.IntensityMAD,
                "monai_autoencoder": monai_baseline.MonaiAutoEncoder,
            }[entry]()
            return model.fit([as_vol(p) for p in items])

        def score_baseline(model: Any, item: Any) -> tuple:
            v = as_vol(item)
            s, vs = model.score(v)
            return s, v.array > 0, vs, s > model.threshold_, model.threshold_, float("nan")

        return fit_baseline, score_baseline
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.persistence import build_detector

    def fit(items: list) -> Any:
        return Engine().fit(build_detector(entry_config(entry)), list(items), show_progress=False).detector

    def score(pipe: Any, item: Any) -> tuple:
        r = pipe.score(item)  # r.mask: the model's own decision, post-processing included
        return r.score_map, r.foreground, r.volume_score, r.mask, r.threshold, pipe.volume_threshold_

    return fit, score


def _map_and_volume_score(scored: tuple) -> tuple[np.ndarray, float]:
    return scored[0], float(scored[2])


def entry_config(entry: Any) -> Any:
    """The validated config of a config entry (tracking off)."""
    from anomaly3d_core.config import build_config
    from anomaly3d_core.persistence import load_any_config

    if isinstance(entry, tuple):
        return load_any_config(entry[0], ["tracking.enabled=false", *entry[1]])
    if isinstance(entry, Path):
        return load_any_config(entry, ["tracking.enabled=false"])
    return build_config({**entry, "tracking": {"enabled": False}})


def run_one(name: str, data: Path, validation: bool = True) -> dict[str, Any]:
    """Fit and score one entry in this process; returns its figures."""
    from anomaly3d_core.evaluation.validation import size_sensitivity
    from anomaly3d_core.io.files import list_inputs, load_volume

    entry = ENTRIES[name]
    train = list_inputs(data / "train")
    tests = list_inputs(data / "test")
    kinds = {
        row["file"].split("/")[-1]: row["lesion_kind"]
        for row in csv.DictReader(open(data / "test_manifest.csv"))
    }
    fit, score = make_method(entry)
    t0 = time.perf_counter()
    model = fit(train)
    fit_s = time.perf_counter() - t0

    truths, maps, fgs, vscores, preds, seconds, names = [], [], [], [], [], [], []
    threshold = vthreshold = None
    for path in tests:
        t1 = time.perf_counter()
        s, fg, vs, pred, threshold, vthreshold = score(model, path)
        seconds.append(time.perf_counter() - t1)
        truths.append(load_volume(data / "test_masks" / path.name, allow_constant=True).array > 0)
        maps.append(s)
        fgs.append(fg)
        vscores.append(vs)
        preds.append(pred)
        names.append(path.name)
    vthreshold = None if vthreshold is None or np.isnan(vthreshold) else vthreshold
    result = {
        "name": name,
        "fit_seconds": round(fit_s, 1),
        "seconds_per_volume": round(float(np.median(seconds)), 3),
    }
    result["all"] = _metrics(truths, maps, fgs, vscores, preds, threshold, vthreshold)
    held = [i for i, n in enumerate(names) if kinds.get(n, "") in HELD_OUT_KINDS or not kinds.get(n)]
    result["held_out_kinds"] = _metrics(
        *([x[i] for i in held] for x in (truths, maps, fgs, vscores, preds)), threshold
    )
    mm3 = [float(np.prod(load_volume(p).spacing)) for p in tests]
    result["size_sensitivity"] = size_sensitivity(
        [t & f for t, f in zip(truths, fgs, strict=True)], preds, mm3
    )
    tune_truths, tune_scores = [], []
    for path in list_inputs(data / "tune"):
        s, fg, *_ = score(model, path)
        tune_truths.append(load_volume(data / "tune_masks" / path.name, allow_constant=True).array[fg] > 0)
        tune_scores.append(s[fg])
    from sklearn.metrics import average_precision_score

    result["tune"] = {
        "pixel_ap": float(average_precision_score(np.concatenate(tune_truths), np.concatenate(tune_scores)))
    }
    if validation:
        result["validation"] = validation_figures(name, data)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def validation_figures(name: str, data: Path) -> dict[str, float]:
    """The row's cross-fitted validation figures over the training normals (no test scan)."""
    from anomaly3d_core.io.files import list_inputs

    fit, score = make_method(ENTRIES[name])
    return validate(fit, lambda m, item: _map_and_volume_score(score(m, item)), list_inputs(data / "train"))


def table(results: list[dict[str, Any]]) -> str:
    atlas = next((r for r in results if "atlas" in r["name"]), None)
    head = (
        "| method | validation AP | tuning-set AP | voxel AP | AP / atlas | voxel AUROC | best Dice "
        "| Dice @ own threshold | sample AUROC | AP held-out kinds | sample AUROC held-out "
        "| sens. < 0.5 cm³ | sens. 0.5-5 cm³ | sens. > 5 cm³ | fit (s) | s / volume | peak RSS (MiB) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        a, h = r["all"], r["held_out_kinds"]
        ratio = (
            a["pixel_ap"] / atlas["all"]["pixel_ap"]
            if atlas and atlas["all"].get("pixel_ap")
            else float("nan")
        )
        val = r.get("validation", {}).get("pixel_ap", float("nan"))
        tune = r.get("tune", {}).get("pixel_ap", float("nan"))
        lines.append(
            f"| {r['name']} | {val:.3f} | {tune:.3f} | {a['pixel_ap']:.3f} | {ratio:.1f}x | {a['pixel_auc']:.3f} | {a['pixel_best_dice']:.3f} | {a['pixel_dice']:.3f} "
            f"| {a.get('volume_auroc', float('nan')):.3f} | {h['pixel_ap']:.3f} | {h.get('volume_auroc', float('nan')):.3f} "
            f"| {size_cells(r)} | {r['fit_seconds']:.0f} | {r['seconds_per_volume']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += ["", *spearman_lines(results, lambda r: r["all"]["pixel_ap"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", help="entry names (substring match)")
    bench_tracking.add_arguments(parser)
    parser.add_argument(
        "--no-validation", action="store_true", help="skip the cross-fitted validation column"
    )
    add_validation_only(parser)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    previous = args.out / "benchmark.json"
    if args.one:
        row = (
            {**previous_row(previous, args.one), "validation": validation_figures(args.one, args.data)}
            if args.validation_only
            else run_one(args.one, args.data, not args.no_validation)
        )
        args.result_file.write_text(json.dumps(row))
        return
    print(f"benchmark data in {make_benchmark_data(args.data)}", flush=True)
    names = [n for n in ENTRIES if not args.only or any(o in n for o in args.only)]
    names = rows_to_validate(args, previous, names)
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"-- {name}", flush=True)
        out = args.out / ".one.json"
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--data", str(args.data), "--result-file", str(out)]
            + ["--out", str(args.out)]
            + (["--no-validation"] if args.no_validation else [])
            + (["--validation-only"] if args.validation_only else []),
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            print(
                f"   failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                flush=True,
            )
            continue
        results.append(json.loads(out.read_text()))
        out.unlink()
        r = results[-1]
        print(
            f"   voxel AP {r['all']['pixel_ap']:.3f}, sample AUROC {r['all'].get('volume_auroc', float('nan')):.3f}, fit {r['fit_seconds']} s",
            flush=True,
        )
    fresh_rows = list(results)
    if args.only or args.validation_only:  # a partial rerun updates its rows and keeps the others
        results = merge_rows(previous, results, ENTRIES)
    text = table(results)
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "benchmark.md").write_text(text + "\n")
    print("\n" + text)
    if not args.no_mlflow:
        rows = fresh_rows  # the rows run now, not those kept from an earlier run
        bench_tracking.log_rows(rows, entry_configs(rows), args.data, args.experiment, "benchmark")
        print(f"\n{len(rows)} row(s) logged to the MLflow experiment '{args.experiment}'")


def entry_configs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """``name -> (config, config name)`` of the rows that a config made (baselines have none)."""
    out = {}
    for r in results:
        entry = ENTRIES.get(r["name"])
        if isinstance(entry, Path | tuple):
            out[r["name"]] = (entry_config(entry), Path(entry[0] if isinstance(entry, tuple) else entry).name)
        elif isinstance(entry, dict):
            out[r["name"]] = (entry_config(entry), "benchmark.py")
    return out


if __name__ == "__main__":
    main()
