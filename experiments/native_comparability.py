"""Cross-scan comparability of the native preset's scores on the native-space benchmark.

    python experiments/native_comparability.py [--data DIR] [--out DIR]

On native scans the preset ranks voxels well inside each scan (per-scan AP) but its score scale
differs from scan to scan (voxel size, site), so pooled voxel AP and sample AUROC fall. This
script measures candidate fixes without touching the core: post-hoc rescaling of each scan's
native score map (robust standardisation ``(s - median) / (1.4826 MAD)`` over the scan's
foreground, or division by a quantile of its foreground scores) and preprocessing/threshold
variants set by config. The volume score of a rescaled map is the mean of its top 1 % foreground
voxels (the pipeline's default). A choice is made on the tuning set (tumour and infarct only)
and every variant is reported on the test set. Results: ``native_comparability.json`` and
``native_comparability.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_data import HELD_OUT_KINDS, make_benchmark_data  # noqa: E402
from benchmark_native import NATIVE_CONFIG, make_method, metrics, score_split, top_fraction_mean  # noqa: E402

CONFIG_VARIANTS: dict[str, dict[str, Any]] = {
    "preset": {},
    "normalize_method=percentile": {"data.preprocessing.normalize_method": "percentile"},
    "target_spacing=1.5": {"data.preprocessing.target_spacing": [1.5, 1.5, 1.5]},
    "smoothing_sigma=1.0": {"threshold.smoothing_sigma": 1.0},
    "smoothing_sigma=2.5": {"threshold.smoothing_sigma": 2.5},
    "target_spacing=2.5": {"data.preprocessing.target_spacing": [2.5, 2.5, 2.5]},
    "augmentation (defaults + bias 0.2, noise 0.1)": {
        "data.augmentation.enabled": True,
        "data.augmentation.bias_field_strength": 0.2,
        "data.augmentation.noise_std": 0.1,
    },
}


def _robust_z(s: np.ndarray) -> np.ndarray:
    med = float(np.median(s))
    mad = 1.4826 * float(np.median(np.abs(s - med)))
    return (s - med) / (mad or 1.0)


def _quantile_div(q: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(s: np.ndarray) -> np.ndarray:
        return s / (float(np.quantile(s, q)) or 1.0)

    return f


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
    "none (pipeline volume score)": None,
    "none": lambda s: s,
    "robust z (median, MAD)": _robust_z,
    "÷ q50": _quantile_div(0.50),
    "÷ q90": _quantile_div(0.90),
    "÷ q99": _quantile_div(0.99),
}


def evaluate(split: dict[str, Any], transform: str) -> dict[str, float]:
    fn = TRANSFORMS[transform]
    scores = split["scores"] if fn is None else [fn(s.astype(np.float64)) for s in split["scores"]]
    vscores = split["vscores"] if fn is None else [top_fraction_mean(s) for s in scores]
    out = metrics(split["truths"], scores, vscores, full=False)
    held = [i for i, k in enumerate(split["kinds"]) if k in HELD_OUT_KINDS or not k]
    if len(held) < len(split["kinds"]) and any(split["truths"][i].any() for i in held):
        out["held_out_ap"] = metrics(
            [split["truths"][i] for i in held],
            [scores[i] for i in held],
            [vscores[i] for i in held],
            full=False,
        )["pixel_ap"]
    return out


def render(rows: list[dict[str, Any]]) -> str:
    """Sort ``rows`` by variant, mark the one with the best tuning-set pooled AP, and tabulate."""
    order = list(CONFIG_VARIANTS)
    rows.sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    best = max(rows, key=lambda r: r["tune"]["pixel_ap"])
    for r in rows:
        r["chosen_on_tuning_set"] = r is best
    head = (
        "| config variant | score-map rescaling | tune: pooled AP | tune: sample AUROC | test: pooled AP "
        "| test: sample AUROC | test: per-scan AP | test: AP held-out kinds |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, t = r["tune"], r["test"]
        mark = " **(chosen on tuning AP)**" if r["chosen_on_tuning_set"] else ""
        lines.append(
            f"| {r['variant']} | {r['transform']}{mark} | {a['pixel_ap']:.3f} | {a['volume_auroc']:.3f} "
            f"| {t['pixel_ap']:.3f} | {t['volume_auroc']:.3f} | {t['per_scan_ap']:.3f} "
            f"| {t.get('held_out_ap', float('nan')):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/native"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", help="config variants (substring match)")
    args = parser.parse_args()
    make_benchmark_data(args.data, space="native")
    train = sorted((args.data / "train").glob("*.nii.gz"))
    rows = []
    for variant, overrides in CONFIG_VARIANTS.items():
        if args.only and not any(o in variant for o in args.only):
            continue
        t0 = time.perf_counter()
        fit, score = make_method(("pipeline", NATIVE_CONFIG, {"data.cache": True, **overrides}))
        model = fit(train)
        splits = {}
        for name in ("tune", "test"):
            out = score_split(model, score, args.data, name)
            splits[name] = {k: out[k] for k in ("truths", "scores", "vscores", "kinds")}
        print(f"-- {variant} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for transform in TRANSFORMS:
            row = {
                "variant": variant,
                "transform": transform,
                "tune": evaluate(splits["tune"], transform),
                "test": evaluate(splits["test"], transform),
            }
            rows.append(row)
            print(
                f"   {transform:30s} tune AP {row['tune']['pixel_ap']:.3f} | test AP {row['test']['pixel_ap']:.3f}, "
                f"sample AUROC {row['test']['volume_auroc']:.3f}, per-scan AP {row['test']['per_scan_ap']:.3f}",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "native_comparability.json"
    if args.only and previous.is_file():  # a partial rerun replaces its variants and keeps the others
        fresh = {r["variant"] for r in rows}
        rows = [r for r in json.loads(previous.read_text()) if r["variant"] not in fresh] + rows
    text = render(rows)
    previous.write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "native_comparability.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
