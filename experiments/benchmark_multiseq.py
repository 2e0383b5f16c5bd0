"""The multi-sequence benchmark: the same subjects scored from T1w alone and from T1w with FLAIR (and T2w).

    python experiments/benchmark_multiseq.py [--space template|native] [--data DIR] [--out DIR]
        [--only NAME ... [--exact]] [--no-validation | --validation-only]

Data: ``bench_data.make_benchmark_data(DIR, sequences=("T1w", "T2w", "FLAIR"), space=...)`` with
fixed seeds (default DIR ``bench_output/data/multiseq`` or ``multiseq_native``), written as BIDS:
16 training normals; a tuning set (two normals, ``tumour`` and ``infarct`` only); a test set of 8
normals and 16 lesioned subjects with four lesion kinds. In native space every sequence has its
own grid (FLAIR with 3-4 mm slices) and the head moves slightly between sequences.

Rows (:func:`entries`): each preset with each sequence set (:data:`SETS`), with signed residuals
(:data:`SIGNED`: ``patches.residual_sign``, ``patches.channel_combine``), in native space with the
deformable registration step (:data:`DEFORMABLE`), and the baselines (:data:`BASELINES`: the FLAIR
one-liner, one- and two-sided). Template space: ``brain_mri.yaml``. Native space: both routes, the
native preset ``brain_mri_native.yaml`` (no registration; scan and depth normalisation) and
``brain_mri.yaml`` (affine registration to MNI152, normative scoring). "validation AP" is the
cross-fitted synthetic-lesion figure over the training normals (``bench_validation``: the figure a
route is chosen by); "tuning-set AP" the old tuning split's, for comparison; Spearman rank
correlations of both with the test AP are printed under the table. Score maps lie on each
subject's T1w grid, where the ground truth is. Voxel metrics are pooled over the T1w brain voxels
of all test subjects; "lesion sens." is the fraction of ground-truth lesions (connected
components) that the model's own decision mask touches, for all kinds, for the small MS-like
lesions and per lesion size; "held-out AP" pools the ``ms`` and ``haemorrhage`` subjects with the
normals. Results: ``benchmark_multiseq[_native].json`` and ``.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
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
from benchmark_native import config_tree, metrics, read_scan  # noqa: E402

SEQUENCES = ("T1w", "T2w", "FLAIR")
PRESETS = {
    "brain_mri.yaml": HERE / "configs" / "brain_mri.yaml",
    "brain_mri_native.yaml": HERE / "configs" / "brain_mri_native.yaml",
    "brain_mri_synthetic.yaml": HERE / "configs" / "brain_mri_synthetic.yaml",
}
SETS = {"T1w alone": ["T1w"], "T1w + FLAIR": ["T1w", "FLAIR"], "T1w + T2w + FLAIR": ["T1w", "T2w", "FLAIR"]}
#: signed-residual variants (patches.residual_sign, patches.channel_combine) run with every preset
SIGNED: dict[str, tuple[list[str], dict[str, Any]]] = {
    "T1w alone, dark": (["T1w"], {"patches.residual_sign": "dark"}),
    "T1w + FLAIR, FLAIR bright": (["T1w", "FLAIR"], {"patches.residual_sign": {"FLAIR": "bright"}}),
    "T1w + FLAIR, FLAIR bright, max": (
        ["T1w", "FLAIR"],
        {"patches.residual_sign": {"FLAIR": "bright"}, "patches.channel_combine": "max"},
    ),
    "T1w + FLAIR, T1w dark, FLAIR bright": (
        ["T1w", "FLAIR"],
        {"patches.residual_sign": {"T1w": "dark", "FLAIR": "bright"}},
    ),
    "T1w + FLAIR, T1w dark, FLAIR bright, max": (
        ["T1w", "FLAIR"],
        {"patches.residual_sign": {"T1w": "dark", "FLAIR": "bright"}, "patches.channel_combine": "max"},
    ),
    "T1w + T2w + FLAIR, physics (T2w, FLAIR bright)": (
        ["T1w", "T2w", "FLAIR"],
        {"patches.residual_sign": "physics"},
    ),
}
#: the deformable step after the affine registration: rows for the registering preset in native space
#: (template-space scans lie in MNI152 space already and are not registered)
DEFORMABLE: dict[str, tuple[list[str], dict[str, Any]]] = {
    "T1w alone, deformable": (["T1w"], {"data.preprocessing.deformable": True}),
    "T1w + FLAIR, FLAIR bright, deformable": (
        ["T1w", "FLAIR"],
        {"patches.residual_sign": {"FLAIR": "bright"}, "data.preprocessing.deformable": True},
    ),
}
#: rows that are no preset: (kind, sequences, method name, options)
BASELINES: dict[str, tuple[str, list[str], str, dict[str, Any]]] = {
    "baseline: FLAIR one-liner max(0, (FLAIR - median) / MAD)": (
        "baseline",
        ["T1w", "FLAIR"],
        "flair_mad",
        {},
    ),
    "baseline: FLAIR two-sided abs(FLAIR - median) / MAD": (
        "baseline",
        ["T1w", "FLAIR"],
        "flair_mad",
        {"two_sided": True},
    ),
}
#: presets per space. In native space both routes run: the native preset (no registration) and
#: brain_mri.yaml (registration to MNI152, normative); the validation column says which.
SPACE_PRESETS = {
    "template": ["brain_mri.yaml"],
    "native": ["brain_mri_native.yaml", "brain_mri.yaml", "brain_mri_synthetic.yaml"],
}
#: rows beyond each space's presets: the synthetic-anomaly detector with T1w + FLAIR in template space
#: (its native row comes from SPACE_PRESETS, whose row names carry the preset)
EXTRA_ROWS: dict[str, dict[str, tuple[list[str], str]]] = {
    "template": {"T1w + FLAIR, brain_mri_synthetic.yaml": (["T1w", "FLAIR"], "brain_mri_synthetic.yaml")},
    "native": {},
}
#: ``--cache``: fits read preprocessed (registered) training scans from the cache (scoring never does)
CACHE = [False]
#: an entry: (kind, sequences, preset or baseline name, overrides or options)
Entry = tuple[str, list[str], str, dict[str, Any]]


def entries(space: str) -> dict[str, Entry]:
    """Row name -> entry for ``space``: every sequence set and signed variant per preset, then the baselines."""
    presets = SPACE_PRESETS[space]
    rows: dict[str, Entry] = {}
    for preset in presets:
        variants = {n: (seqs, {}) for n, seqs in SETS.items()}
        if "synthetic" not in preset:  # residual signs are the autoencoder's
            variants |= SIGNED
        if space == "native" and preset == "brain_mri.yaml":
            variants |= DEFORMABLE
        for name, (seqs, overrides) in variants.items():
            rows[f"{name}, {preset}" if len(presets) > 1 else name] = ("pipeline", seqs, preset, overrides)
    for name, (seqs, preset) in EXTRA_ROWS[space].items():
        rows[name] = ("pipeline", seqs, preset, {})
    return {**rows, **BASELINES}


def lesion_sensitivity(truths: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """Fraction of ground-truth lesions (26-connected components) touched by the predicted mask."""
    from anomaly3d_core.evaluation.metrics import lesion_detection

    tp = fn = 0
    for t, p in zip(truths, preds, strict=True):
        if t.any():
            found = lesion_detection(t, p)
            tp, fn = tp + found["tp"], fn + found["fn"]
    return tp / (tp + fn) if tp + fn else float("nan")


def make_method(entry: Entry) -> tuple[Callable[[list], Any], Callable[[Any, Any], tuple]]:
    """``fit(subjects) -> model`` and ``score(model, subject) -> (map on the T1w grid, volume score, mask)``."""
    kind, sequences, spec, options = entry
    if kind == "pipeline":
        from anomaly3d_core.pipeline import AnomalyDetectionPipeline

        def fit(items: list) -> Any:
            if "synthetic" in spec:  # a detector config with a top-level 'synthetic' section
                from anomaly3d_core.persistence import build_detector

                return build_detector(synthetic_config(PRESETS[spec], sequences)).fit(
                    items, show_progress=False
                )
            tree = config_tree(
                PRESETS[spec], {"data.sequences": sequences, "data.cache": CACHE[0], **options}
            )
            return AnomalyDetectionPipeline(tree).fit(items, show_progress=False)

        def score(model: Any, item: Any) -> tuple:
            r = model.score(item)
            return np.asarray(r.score_map, np.float32), float(r.volume_score), r.mask

        return fit, score
    import baselines

    from anomaly3d_core.io.data import as_volume
    from anomaly3d_core.io.files import load_volume
    from anomaly3d_core.io.subjects import as_subject
    from anomaly3d_core.preprocess.sequences import align, read_subject

    def on_grid(
        item: Any,
    ) -> Any:  # the sequences co-registered onto the T1w grid, as the pipeline's first step puts them
        read = lambda x: load_volume(x) if isinstance(x, str | Path) else as_volume(x)  # noqa: E731
        return align(read_subject(as_subject(item), sequences, read), "auto")[0]

    def fit_baseline(items: list) -> Any:
        return {"flair_mad": baselines.FlairMAD}[spec](**options).fit([on_grid(i) for i in items])

    def score_baseline(model: Any, item: Any) -> tuple:
        v = on_grid(item)
        s, vs = model.score(v)
        return s, float(vs), (s > model.threshold_) & (v.channel(0) != 0)

    return fit_baseline, score_baseline


def score_split(model: Any, score: Callable, data: Path, split: str, channels: list[str]) -> dict[str, list]:
    """Foreground truths and scores, volume scores, decision masks, kinds, voxel volumes and seconds of a split."""
    from anomaly3d_core.io.data import list_items

    kinds = {r["subject"]: r["lesion_kind"] for r in csv.DictReader(open(data / f"{split}_manifest.csv"))}
    out: dict[str, list] = {
        k: [] for k in ("truths", "scores", "vscores", "preds", "kinds", "mm3", "seconds")
    }
    for subject in list_items(data / split, channels).items:
        t0 = time.perf_counter()
        smap, vscore, decided = score(model, subject)
        out["seconds"].append(time.perf_counter() - t0)
        image, affine = read_scan(Path(subject.files["T1w"]))
        mask, _ = read_scan(data / f"{split}_masks" / f"{subject.stem}.nii.gz")
        if smap.shape != image.shape:
            raise RuntimeError(f"{subject}: score map {smap.shape} is not on the T1w grid {image.shape}")
        fg = image != 0
        out["truths"].append(mask[fg] > 0)
        out["scores"].append(smap[fg])
        out["vscores"].append(vscore)
        out["preds"].append((mask > 0, decided & fg))
        out["kinds"].append(kinds.get(subject.stem, kinds.get(subject.subject, "")))
        out["mm3"].append(float(abs(np.linalg.det(affine[:3, :3]))))
    return out


def synthetic_config(path: Path, sequences: list[str]) -> Any:
    """A synthetic-detector preset for ``sequences``; tracking and the cache off."""
    from anomaly3d_core.persistence import load_any_config

    return load_any_config(
        path, ["tracking.enabled=false", "data.cache=false", f"data.sequences=[{','.join(sequences)}]"]
    )


def run_one(name: str, data: Path, space: str, validation: bool = True) -> dict[str, Any]:
    from anomaly3d_core.evaluation.validation import size_sensitivity
    from anomaly3d_core.io.data import list_items

    entry = entries(space)[name]
    kind, sequences, spec, options = entry
    channels = ["T1w", *[s for s in sequences if s != "T1w"]]
    fit, score = make_method(entry)
    train = list_items(data / "train", channels).items
    t0 = time.perf_counter()
    model = fit(train)
    fit_s = time.perf_counter() - t0
    tune = score_split(model, score, data, "tune", channels)
    test = score_split(model, score, data, "test", channels)
    kinds = test["kinds"]
    held = [i for i, k in enumerate(kinds) if k in HELD_OUT_KINDS or not k]
    ms = [i for i, k in enumerate(kinds) if k == "ms"]
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    preds = test["preds"]
    row = {
        "name": name,
        "sequences": sequences,
        "preset": spec if kind == "pipeline" else None,
        "overrides": options if kind == "pipeline" else {},
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
        "size_sensitivity": size_sensitivity([p[0] for p in preds], [p[1] for p in preds], test["mm3"]),
        "n_test": len(kinds),
        "n_ms": len(ms),
    }
    if validation:
        row["validation"] = validation_figures(name, data, space)
    return row


def validation_figures(name: str, data: Path, space: str, seed: int = 0) -> dict[str, float]:
    """The row's cross-fitted validation figures over the training normals (no test subject);
    ``seed`` draws other folds and other lesions (how stable a choice is)."""
    from anomaly3d_core.io.data import list_items

    entry = entries(space)[name]
    channels = ["T1w", *[s for s in entry[1] if s != "T1w"]]
    fit, score = make_method(entry)
    train = list_items(data / "train", channels).items
    return validate(fit, lambda m, item: score(m, item)[:2], train, channels, seed=seed)


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| sequences | validation AP | tuning-set AP | voxel AP (pooled) | best Dice | sample AUROC | held-out AP "
        "| lesion sens. (all) | lesion sens. (MS) | sens. < 0.5 cm³ | sens. 0.5-5 cm³ | sens. > 5 cm³ "
        "| fit (s) | s / subject |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        a = r["all"]
        tune = r.get("tune", {}).get("pixel_ap", float("nan"))
        val = r.get("validation", {}).get("pixel_ap", float("nan"))
        lines.append(
            f"| {r['name']} | {val:.3f} | {tune:.3f} | {a['pixel_ap']:.3f} | {a['pixel_best_dice']:.3f} "
            f"| {a['volume_auroc']:.3f} | {r['held_out_kinds']['pixel_ap']:.3f} | {r['lesion_sensitivity']:.3f} "
            f"| {r['ms_lesion_sensitivity']:.3f} | {size_cells(r)} | {r['fit_seconds']:.0f} "
            f"| {r['seconds_per_subject']:.2f} |"
        )
    lines += ["", *spearman_lines(results, lambda r: r["all"]["pixel_ap"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--space", choices=tuple(SPACE_PRESETS), default="template")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", help="entry names (substring match)")
    parser.add_argument("--exact", action="store_true", help="--only names are exact row names")
    parser.add_argument(
        "--no-validation", action="store_true", help="skip the cross-fitted validation column"
    )
    add_validation_only(parser)
    parser.add_argument(
        "--validation-seed",
        type=int,
        default=0,
        help="with --validation-only: another draw of folds and lesions (default 0, the tables' own)",
    )
    parser.add_argument("--partial", type=Path, help="write the finished rows to this JSON after each row")
    parser.add_argument(
        "--cache",
        action="store_true",
        help="preprocessing cache for fits (fit times then exclude registration)",
    )
    bench_tracking.add_arguments(parser)
    args = parser.parse_args()
    data = args.data or Path("bench_output/data") / (
        "multiseq" if args.space == "template" else "multiseq_native"
    )
    print(
        f"multi-sequence benchmark data in {make_benchmark_data(data, space=args.space, sequences=SEQUENCES)}"
    )
    rows = entries(args.space)
    CACHE[0] = args.cache
    names = [n for n in rows if not args.only or any((o == n) if args.exact else (o in n) for o in args.only)]
    suffix = "" if args.space == "template" else "_native"
    previous = args.out / f"benchmark_multiseq{suffix}.json"
    names = rows_to_validate(args, previous, names)
    results = []
    for name in names:
        print(f"-- {name}", flush=True)
        if args.validation_only:
            figures = validation_figures(name, data, args.space, args.validation_seed)
            results.append({**previous_row(previous, name), "validation": figures})
        else:
            results.append(run_one(name, data, args.space, not args.no_validation))
        r = results[-1]
        print(
            f"   validation AP {r.get('validation', {}).get('pixel_ap', float('nan')):.3f}, "
            f"voxel AP {r['all']['pixel_ap']:.3f}, sample AUROC {r['all']['volume_auroc']:.3f}, MS lesion "
            f"sensitivity {r['ms_lesion_sensitivity']:.3f}, fit {r['fit_seconds']} s, "
            f"{r['seconds_per_subject']} s/subject",
            flush=True,
        )
        if args.partial:  # every finished row at once, so a stopped run keeps what it measured
            args.partial.write_text(json.dumps(results, indent=2) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    fresh_rows = list(results)
    if args.only or args.validation_only:  # a partial rerun updates its rows and keeps the others
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
                else build_config(
                    config_tree(PRESETS[r["preset"]], {"data.sequences": r["sequences"], **r["overrides"]})
                ),
                r["preset"],
            )
            for r in fresh_rows
            if r.get("preset")
        }
        bench_tracking.log_rows(fresh_rows, configs, data, args.experiment, f"benchmark_multiseq{suffix}")
        print(f"\n{len(fresh_rows)} row(s) logged to the MLflow experiment '{args.experiment}'")


if __name__ == "__main__":
    main()
