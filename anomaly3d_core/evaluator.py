"""Evaluating a batch of scans against their ground-truth masks: find each scan's mask, score it,
and write ``metrics.json``, ``summary.txt``, the per-subject and per-lesion tables, plots, overlays
and reports. Bad files are carried past and returned, as in scoring (:mod:`.runner`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.detector import Detector
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.data import BatchFailures
from anomaly3d_core.io.files import atomic_write, load_volume, output_path, output_stems, scan_stem
from anomaly3d_core.io.subjects import Subject
from anomaly3d_core.preprocess.registration import registration_quality
from anomaly3d_core.progress import progress
from anomaly3d_core.runner import report_writer, subject_columns
from anomaly3d_core.scores import decision_columns

SUMMARY_KEYS = (
    "pixel_ap",
    "pixel_auc",
    "pixel_best_dice",
    "pixel_dice",
    "pixel_iou",
    "per_volume_dice_mean",
    "lesion_sensitivity",
    "lesion_fp_per_volume",
    "volume_auroc",
    "volume_accuracy",
    "volume_f1",
)


GUARANTEE_KEYS = (
    "normal_flagged_fraction",
    "lesioned_flagged_fraction",
    "voxel_fdr_lesioned",
    "fp_clusters_per_normal_scan",
    "normal_scans_with_fp_cluster",
    "fp_clusters_per_lesioned_scan",
    "lesion_sensitivity_lt0.5_cm3",
    "lesion_sensitivity_0.5to5_cm3",
    "lesion_sensitivity_gt5_cm3",
    "scan_auroc_p_value",
    "scan_auroc_top_k_mean",
)


def find_mask(scan: Path, masks_dir: Path, registry: Any = None, stem: str | None = None) -> Path:
    """The ground-truth file for ``scan``: exactly its name, ``<stem>_mask`` or ``<stem>_seg`` (any scan extension).

    ``stem`` (from :func:`~anomaly3d_core.io.files.output_stems`) may hold a sub-folder, looked
    for under ``masks_dir`` too. More than one match is an error naming them.
    """
    stem = stem or scan_stem(scan, registry)
    sub, _, base = stem.rpartition("/")
    folder = masks_dir / sub if sub else masks_dir
    wanted = {base, f"{base}_mask", f"{base}_seg"}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        raise DataError(scan, f"masks folder {folder} cannot be read (missing or not a folder)") from None
    matches = [
        c
        for c in entries
        if not c.name.startswith(".") and (c.name == scan.name or scan_stem(c, registry) in wanted)
    ]
    if not matches:
        raise DataError(
            scan,
            f"no ground-truth mask for it in {folder} (looked for {scan.name}, {base}_mask.*, {base}_seg.*)",
        )
    if len(matches) > 1:
        raise DataError(
            scan,
            f"ambiguous ground truth in {folder}: {', '.join(m.name for m in matches)} all match; keep one",
        )
    return matches[0]


def evaluate_files(
    pipeline: Detector,
    inputs: list[Path | Subject],
    masks_dir: Path,
    out_dir: Path,
    n_overlays: int | None = None,
    model_uri: str = "",
    reports: bool = True,
) -> tuple[dict[str, Any], BatchFailures]:
    """Score ``inputs``, compare with masks, write ``metrics.json``, ``summary.txt``, ``subjects.tsv``,
    ``lesions.tsv``, plots, overlays and (with ``reports``) an HTML report per scan and
    ``report.html`` for the group.

    Lesion kinds for the per-kind table come from a ``manifest.csv`` beside ``masks_dir`` with a
    ``lesion_kind`` column (as ``anomaly3d demo-data`` writes), when there is one."""
    # matplotlib and scikit-learn: imported for evaluation only, so plain scoring does not load them
    from anomaly3d_core.evaluation import plotting
    from anomaly3d_core.evaluation.guarantees import result_guarantees
    from anomaly3d_core.evaluation.metrics import comprehensive_evaluation
    from anomaly3d_core.postprocess.calibration import top_k_mean
    from anomaly3d_core.postprocess.thresholding import multi_threshold_analysis
    from anomaly3d_core.reports.evaluation import lesion_kinds, subject_evaluation, write_tables
    from anomaly3d_core.reports.subject import decision_text

    failures = BatchFailures()
    results, truths, foregrounds, names, rows, top_ks = [], [], [], [], [], []
    subjects: list[dict[str, Any]] = []
    lesions: list[dict[str, Any]] = []
    kinds = lesion_kinds(masks_dir, pipeline.registry)
    writer = report_writer(pipeline, out_dir, model_uri) if reports else None
    stems = output_stems(inputs, pipeline.registry)  # a name clash refuses the batch before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, stem in progress(list(zip(inputs, stems, strict=True)), desc="evaluating", total=len(inputs)):
        try:
            volume = pipeline.read(path)
            scan = Path(volume.path) if isinstance(path, Subject) else path  # a subject: its reference file
            mask_path = find_mask(scan, masks_dir, pipeline.registry, stem)
            truth = load_volume(mask_path, registry=pipeline.registry, allow_constant=True).array > 0
            if truth.shape != volume.shape:
                raise DataError(path, f"mask grid {truth.shape} differs from the scan's {volume.shape}")
            result = pipeline.score(volume)
        except Exception as exc:  # one bad file never stops the batch, whatever it raises
            failures.record(path, exc)
            continue
        row = {
            "file": result.volume.path,
            **decision_columns(result),
            **registration_quality(result.prepared),
            **(subject_columns(path) if isinstance(path, Subject) else {}),
        }
        top_ks.append(top_k_mean(result.prepared_scores, result.prepared.mask, 0.01))
        found, found_lesions = subject_evaluation(result, truth, stem, kinds.get(stem, ""))
        subjects.append(found)
        lesions += found_lesions
        if writer is not None:
            writer.subject(result, row, stem, truth=truth)
        result.prepared = result.prepared_scores = result.p_map = None  # keep only what the metrics need
        results.append(result)
        truths.append(truth)
        foregrounds.append(result.foreground)
        names.append(stem)
        rows.append(row)
    if not results:
        raise DataError(None, "no volume could be evaluated:\n" + failures.report())
    metrics = comprehensive_evaluation(
        truths,
        [r.score_map for r in results],
        pipeline.threshold_,
        predicted_masks=[r.mask for r in results],
        foreground_masks=foregrounds,
        volume_scores=[r.volume_score for r in results],
        volume_threshold=pipeline.volume_threshold_,
    )
    metrics |= result_guarantees(results, truths, top_ks)
    metrics["seconds_per_volume"] = float(np.mean([r.seconds for r in results]))
    metrics["files"] = [
        {
            "file": r.volume.path,
            "volume_score": r.volume_score,
            "p_value": r.p_value,
            "is_anomalous": r.is_anomalous,
            "has_lesion": bool(t.any()),
        }
        for r, t in zip(results, truths, strict=True)
    ]
    atomic_write(
        out_dir / "metrics.json",
        lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2, default=float)),
    )
    atomic_write(
        out_dir / "summary.txt",
        lambda tmp: Path(tmp).write_text(summary_table(metrics) + "\n" + metric_legend(metrics)),
    )
    gt_in = [t[f] for t, f in zip(truths, foregrounds, strict=True)]
    sc_in = [r.score_map[f] for r, f in zip(results, foregrounds, strict=True)]
    write_tables(out_dir, subjects, lesions)
    plots = []
    if any(g.any() for g in gt_in):
        curve = [("model", gt_in, sc_in)]
        plotting.plot_roc_curves(curve, out_dir / "roc.png", reported=[metrics.get("pixel_auc")])
        plotting.plot_precision_recall_curves(curve, out_dir / "pr.png", reported=[metrics.get("pixel_ap")])
        g, s = np.concatenate(gt_in), np.concatenate(sc_in)
        plotting.plot_score_distributions(
            s[~g], s[g], pipeline.threshold_, out_dir / "score_distribution.png"
        )
        top = max(float(np.percentile(s, 99.99)), 1.1 * float(pipeline.threshold_))
        analysis = multi_threshold_analysis(s, (0.0, top), 60, ground_truth=g)
        plotting.visualize_threshold_analysis(
            analysis, out_dir / "threshold_analysis.png", threshold=pipeline.threshold_
        )
        plots = ["roc.png", "pr.png", "score_distribution.png", "threshold_analysis.png"]
    plotting.plot_volume_scores(
        names,
        [r.volume_score for r in results],
        pipeline.volume_threshold_,
        [bool(t.any()) for t in truths],
        out_dir / "volume_scores.png",
    )
    order = np.argsort([-r.volume_score for r in results])[:n_overlays]  # None: every volume
    sequences = pipeline.channels
    for i in order:
        r = results[i]
        png = output_path(out_dir / "overlays", f"{names[i]}.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        plotting.plot_overlay(
            r.volume.array,
            r.score_map,
            r.mask,
            truths[i],
            png,
            title=names[i],
            affine=r.volume.affine,
            sequences=sequences,
            threshold=r.threshold,
            decision=decision_text({**rows[i], "volume_threshold": pipeline.volume_threshold_}),
        )
    if writer is not None:
        from anomaly3d_core.reports.html import file_data_uri

        figures = [(file_data_uri(out_dir / p), PLOT_CAPTIONS[p]) for p in plots]
        writer.group(
            rows,
            names,
            evaluation={"metrics": metrics, "subjects": subjects, "lesions": lesions},
            figures=figures,
        )
    return metrics, failures


PLOT_CAPTIONS = {
    "roc.png": "voxel ROC curve (pooled over scans, inside the brain)",
    "pr.png": "voxel precision-recall curve; its AP is the summary's pixel_ap",
    "score_distribution.png": "voxel scores of normal and lesion voxels, with the model's voxel threshold",
    "threshold_analysis.png": "what each voxel threshold would give (dashed: the model's own threshold)",
}


def metric_legend(metrics: dict[str, Any]) -> str:
    """What each reported metric means (the lines of summary.txt below the table)."""
    from anomaly3d_core.reports.group import METRIC_HELP

    return "".join(f"{k}: {v}\n" for k, v in METRIC_HELP.items() if k in metrics)


def summary_table(metrics: dict[str, Any]) -> str:
    lines = [f"{'metric':<42}{'value':>10}  95% CI"]
    for key in SUMMARY_KEYS:
        if key in metrics:
            ci = metrics.get(f"{key}_ci")
            ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"{key:<42}{metrics[key]:>10.4f}  {ci_text}")
    calibrated = any(np.isfinite(f["p_value"]) for f in metrics.get("files", [{"p_value": 0.0}]))
    for key in (f"guarantee_{k}" for k in GUARANTEE_KEYS):
        if key in metrics:
            ci = metrics.get(f"{key}_ci")
            note = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            if key.startswith("guarantee_lesion_sensitivity_"):
                note = f"({metrics.get(key.replace('_lesion_sensitivity_', '_n_lesions_'), 0)} lesions)"
            value = metrics[key]
            shown = f"{value:>10.4f}" if np.isfinite(value) else f"{'n/a':>10}"
            if key == "guarantee_scan_auroc_p_value" and not calibrated:
                shown, note = f"{'n/a':>10}", "not calibrated (the model has no calibration nulls)"
            lines.append(f"{key:<42}{shown}  {note}".rstrip())
    lines.append(f"{'volumes':<42}{metrics['n_volumes']:>10d}")
    return "\n".join(lines) + "\n"
