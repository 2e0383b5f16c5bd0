"""Batch work behind the CLI: fit from files, score folders, evaluate against masks.

Every batch carries on past bad files and returns them as :class:`BatchFailures`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly3d_core.detector import Detector, ScoreResult
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.data import BatchFailures
from anomaly3d_core.io.files import atomic_write, load_volume, save_nifti
from anomaly3d_core.progress import progress

log = logging.getLogger(__name__)
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


@dataclass
class ScoredBatch:
    rows: list[dict[str, Any]] = field(default_factory=list)
    results: list[ScoreResult] = field(default_factory=list)
    failures: BatchFailures = field(default_factory=BatchFailures)


def write_result(result: ScoreResult, out_dir: Path) -> dict[str, Any]:
    """Write ``<stem>_score.nii.gz`` and ``<stem>_mask.nii.gz`` on the input's grid."""
    stem = result.volume.stem
    save_nifti(result.score_map.astype(np.float32), result.volume.affine, out_dir / f"{stem}_score.nii.gz")
    save_nifti(result.mask.astype(np.uint8), result.volume.affine, out_dir / f"{stem}_mask.nii.gz")
    return {
        "file": result.volume.path,
        "volume_score": round(result.volume_score, 6),
        "is_anomalous": result.is_anomalous,
        "threshold": round(result.threshold, 6),
    }


def write_csv(
    rows: list[dict[str, Any]],
    path: Path,
    fields: tuple[str, ...] = ("file", "volume_score", "is_anomalous", "threshold"),
) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def score_files(
    pipeline: Detector, inputs: list[Path], out_dir: Path, keep_results: bool = False
) -> ScoredBatch:
    """Score every input, write its maps and ``scores.csv``; bad inputs go to ``failures``."""
    batch = ScoredBatch()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in progress(inputs, desc="scoring", total=len(inputs)):
        try:
            result = pipeline.score(pipeline.read(path))
        except DataError as exc:
            batch.failures.add(exc)
            continue
        batch.rows.append(write_result(result, out_dir))
        if keep_results:
            batch.results.append(result)
    write_csv(batch.rows, out_dir / "scores.csv")
    return batch


def find_mask(scan: Path, masks_dir: Path) -> Path:
    """The ground-truth file for ``scan``: same name, or ``<stem>_mask``/``<stem>_seg`` with any extension."""
    stem = scan.name.split(".")[0]
    for candidate in [
        masks_dir / scan.name,
        *sorted(masks_dir.glob(f"{stem}_mask.*")),
        *sorted(masks_dir.glob(f"{stem}_seg.*")),
        *sorted(masks_dir.glob(f"{stem}.*")),
    ]:
        if candidate.exists():
            return candidate
    raise DataError(
        scan,
        f"no ground-truth mask for it in {masks_dir} (looked for {scan.name}, {stem}_mask.*, {stem}_seg.*)",
    )


def evaluate_files(
    pipeline: Detector,
    inputs: list[Path],
    masks_dir: Path,
    out_dir: Path,
    n_overlays: int | None = None,
) -> tuple[dict[str, Any], BatchFailures]:
    """Score ``inputs``, compare with masks, write ``metrics.json``, ``summary.txt`` and plots."""
    # matplotlib and scikit-learn: imported for evaluation only, so plain scoring does not load them
    from anomaly3d_core.evaluation import plotting
    from anomaly3d_core.evaluation.metrics import comprehensive_evaluation
    from anomaly3d_core.postprocess.thresholding import multi_threshold_analysis

    failures = BatchFailures()
    results, truths, foregrounds = [], [], []
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in progress(inputs, desc="evaluating", total=len(inputs)):
        try:
            volume = pipeline.read(path)
            truth = (
                load_volume(find_mask(path, masks_dir), registry=pipeline.registry, allow_constant=True).array
                > 0
            )
        except DataError as exc:
            failures.add(exc)
            continue
        if truth.shape != volume.array.shape:
            failures.add(
                DataError(path, f"mask grid {truth.shape} differs from the scan's {volume.array.shape}")
            )
            continue
        result = pipeline.score(volume)
        result.prepared = result.prepared_scores = None  # keep only what the metrics need
        results.append(result)
        truths.append(truth)
        foregrounds.append(result.foreground)
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
    metrics["seconds_per_volume"] = float(np.mean([r.seconds for r in results]))
    metrics["files"] = [
        {
            "file": r.volume.path,
            "volume_score": r.volume_score,
            "is_anomalous": r.is_anomalous,
            "has_lesion": bool(t.any()),
        }
        for r, t in zip(results, truths, strict=True)
    ]
    atomic_write(
        out_dir / "metrics.json",
        lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2, default=float)),
    )
    atomic_write(out_dir / "summary.txt", lambda tmp: Path(tmp).write_text(summary_table(metrics)))
    gt_in = [t[f] for t, f in zip(truths, foregrounds, strict=True)]
    sc_in = [r.score_map[f] for r, f in zip(results, foregrounds, strict=True)]
    if any(g.any() for g in gt_in):
        plotting.plot_roc_curves([("model", gt_in, sc_in)], out_dir / "roc.png")
        plotting.plot_precision_recall_curves([("model", gt_in, sc_in)], out_dir / "pr.png")
        g, s = np.concatenate(gt_in), np.concatenate(sc_in)
        plotting.plot_score_distributions(
            s[~g], s[g], pipeline.threshold_, out_dir / "score_distribution.png"
        )
        analysis = multi_threshold_analysis(s, (0.0, float(np.percentile(s, 99.99))), 60, ground_truth=g)
        plotting.visualize_threshold_analysis(analysis, out_dir / "threshold_analysis.png")
    order = np.argsort([-r.volume_score for r in results])[:n_overlays]  # None: every volume
    for i in order:
        r = results[i]
        plotting.plot_overlay(
            r.volume.array,
            r.score_map,
            r.mask,
            truths[i],
            out_dir / "overlays" / f"{r.volume.stem}.png",
            title=r.volume.stem,
        )
    return metrics, failures


def summary_table(metrics: dict[str, Any]) -> str:
    lines = [f"{'metric':<24}{'value':>10}  95% CI"]
    for key in SUMMARY_KEYS:
        if key in metrics:
            ci = metrics.get(f"{key}_ci")
            ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"{key:<24}{metrics[key]:>10.4f}  {ci_text}")
    lines.append(f"{'volumes':<24}{metrics['n_volumes']:>10d}")
    return "\n".join(lines) + "\n"
