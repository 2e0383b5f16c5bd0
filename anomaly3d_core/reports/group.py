"""The group report: every scan's score against the scan threshold, the flagged subjects, data-quality
flags, and after an evaluation the metrics explained and tables per subject, lesion kind and size."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import anomaly3d_core.reports.html as html
from anomaly3d_core.reports.subject import _number, quality_flags

# What each reported metric means, in the words a reader of the summary needs.
METRIC_HELP = {
    "pixel_ap": "voxel average precision: area under the precision-recall curve over all voxels inside the "
    "brain, pooled over scans (threshold-free; 1 is perfect, the lesion fraction is chance)",
    "pixel_auc": "voxel ROC AUC, pooled over scans (threshold-free; 0.5 is chance)",
    "pixel_best_dice": "the best Dice any single voxel threshold could give on these scans (an upper bound, "
    "chosen with the truth: not what the model delivers)",
    "pixel_dice": "Dice of the model's own mask (its calibrated threshold and post-processing) with the "
    "truth, pooled: what a user gets",
    "pixel_iou": "intersection over union of the model's mask with the truth, pooled",
    "per_volume_dice_mean": "mean over scans with a lesion of each scan's Dice",
    "lesion_sensitivity": "share of true lesions (26-connected components) touched by the model's mask",
    "lesion_fp_per_volume": "flagged clusters touching no true lesion, per scan (false alarms a reader would "
    "inspect)",
    "volume_auroc": "scan-level ROC AUC of the scan scores (lesion or not)",
    "volume_accuracy": "share of scans whose decision (score above the scan threshold) matches the truth",
    "volume_f1": "F1 of the scan decisions, lesion scans as positives",
    # the measured guarantees (README, Decisions with stated error rates: The guarantees measured)
    "guarantee_alpha": "the level alpha of the scan decisions and the cluster mask (threshold.alpha)",
    "guarantee_n_normal_scans": "scans without any lesion voxel, on which the false-alarm figures are measured",
    "guarantee_n_lesioned_scans": "scans with lesion voxels, on which power and FDR are measured",
    "guarantee_normal_flagged_fraction": "share of normal scans flagged, with its Clopper-Pearson 95 % interval: "
    "alpha promises at most alpha (on average over calibration sets) when decision_rule is p_value <= alpha",
    "guarantee_lesioned_flagged_fraction": "share of lesioned scans flagged (power at alpha; no promise)",
    "guarantee_voxel_fdr_lesioned": "mean over lesioned scans of false voxels / flagged voxels of the mask "
    "(Benjamini-Hochberg's mask_rule fdr promises at most q)",
    "guarantee_fp_clusters_per_normal_scan": "flagged clusters per normal scan (all are false)",
    "guarantee_normal_scans_with_fp_cluster": "share of normal scans with any flagged cluster (mask_rule "
    "cluster promises at most alpha: family-wise)",
    "guarantee_fp_clusters_per_lesioned_scan": "flagged clusters touching no lesion, per lesioned scan",
    "guarantee_lesion_sensitivity_lt0.5_cm3": "share of true lesions under 0.5 cm3 touched by the mask",
    "guarantee_lesion_sensitivity_0.5to5_cm3": "share of true lesions of 0.5-5 cm3 touched by the mask",
    "guarantee_lesion_sensitivity_gt5_cm3": "share of true lesions over 5 cm3 touched by the mask",
    "guarantee_n_lesions_lt0.5_cm3": "true lesions under 0.5 cm3 (26-connected components)",
    "guarantee_n_lesions_0.5to5_cm3": "true lesions of 0.5-5 cm3",
    "guarantee_n_lesions_gt5_cm3": "true lesions over 5 cm3",
    "guarantee_scan_auroc_p_value": "scan ROC AUC of the p-value (smaller is more anomalous); n/a: not "
    "calibrated (a model saved before calibration nulls has no p-values)",
    "guarantee_scan_auroc_top_k_mean": "scan ROC AUC of the top-1 % mean voxel score (the reference)",
}
SIZE_BINS_ML = (0.0, 0.5, 2.0, 10.0, float("inf"))


def _flag(row: Mapping[str, Any]) -> bool:
    return str(row.get("is_anomalous")).lower() in ("true", "1")


def _name(row: Mapping[str, Any]) -> str:
    if row.get("name"):
        return str(row["name"])
    subject = row.get("subject") or ""
    session = row.get("session") or ""
    if subject:
        return f"{subject}_{session}" if session else str(subject)
    return Path(str(row.get("file", "?"))).name


def _link(name: str, hrefs: Mapping[str, str]) -> str:
    href = hrefs.get(name)
    return f'<a href="{html.esc(href)}">{html.esc(name)}</a>' if href else html.esc(name)


def scan_score_figure(rows: Sequence[Mapping[str, Any]], threshold: float | None, labels: Any = None) -> str:
    from anomaly3d_core.evaluation.plotting import plot_volume_scores

    fig = plot_volume_scores(
        [_name(r) for r in rows], [float(r["volume_score"]) for r in rows], threshold, labels
    )
    return html.figure(
        html.png_data_uri(fig),
        "scan scores (one dot per scan) against the scan-level threshold: scans right of the dashed line are flagged",
    )


def size_bin(volume_ml: float) -> str:
    for lo, hi in zip(SIZE_BINS_ML, SIZE_BINS_ML[1:], strict=False):
        if lo <= volume_ml < hi:
            return f"{lo:g}–{hi:g} ml" if np.isfinite(hi) else f"≥ {lo:g} ml"
    return "?"


def kind_table(subjects: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per lesion kind (``normal`` for scans without one): scans, flagged, Dice, lesions found."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for s in subjects:
        groups[s.get("kind") or ("lesion" if s.get("has_lesion") else "normal")].append(s)
    out = []
    for kind, items in sorted(groups.items()):
        dice = [s["dice"] for s in items if s.get("has_lesion") and s.get("dice") is not None]
        lesions = sum(int(s.get("n_lesions", 0)) for s in items)
        found = sum(int(s.get("n_detected", 0)) for s in items)
        out.append(
            {
                "kind": kind,
                "scans": len(items),
                "flagged": sum(bool(s.get("is_anomalous")) for s in items),
                "mean_dice": float(np.mean(dice)) if dice else None,
                "lesions": lesions,
                "detected": found,
                "sensitivity": found / lesions if lesions else None,
                "false_clusters": sum(int(s.get("false_clusters", 0)) for s in items),
            }
        )
    return out


def size_table(lesions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per lesion size (ml): lesions, detected, sensitivity."""
    groups: dict[float, list[Mapping[str, Any]]] = defaultdict(list)
    for lesion in lesions:
        lo = max(b for b in SIZE_BINS_ML if b <= float(lesion["volume_ml"]))
        groups[lo].append(lesion)
    return [
        {
            "size": size_bin(lo),
            "lesions": len(items),
            "detected": sum(bool(x["detected"]) for x in items),
            "sensitivity": sum(bool(x["detected"]) for x in items) / len(items),
        }
        for lo, items in sorted(groups.items())
    ]


def group_report(
    rows: Sequence[Mapping[str, Any]],
    model: Mapping[str, Any],
    *,
    hrefs: Mapping[str, str] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    figures: Sequence[tuple[str, str]] = (),
    title: str = "anomaly3d group report",
) -> str:
    """The group page's HTML. ``rows`` are ``scores.csv`` rows; ``hrefs`` link subject names to their
    reports; ``evaluation`` holds ``metrics``, ``subjects`` and ``lesions`` (see
    :func:`~anomaly3d_core.evaluator.evaluate_files`); ``figures`` are ``(data URI, caption)`` pairs."""
    hrefs = dict(hrefs or {})
    threshold = _number(model.get("scan threshold"))
    flagged = [r for r in rows if _flag(r)]
    parts = [
        f'<p id="counts">{len(rows)} scan(s), <b>{len(flagged)} flagged anomalous</b>'
        + (f" (scan score above {threshold:.4g})" if threshold is not None else "")
        + ".</p>"
    ]
    issues = [(r, f) for r in rows for f in quality_flags(r)]
    if issues:
        parts.append(
            html.warning(f"{len({_name(r) for r, _ in issues})} scan(s) with data-quality flags: see below")
        )
    if rows:
        truth = None
        if evaluation:
            by_name = {s["name"]: bool(s.get("has_lesion")) for s in evaluation.get("subjects", [])}
            truth = [by_name.get(_name(r)) for r in rows]
        parts.append("<h2>Scan scores</h2>" + scan_score_figure(rows, threshold, truth))
    parts.append("<h2>Flagged subjects</h2>")
    table_rows = []
    for r in sorted(rows, key=lambda r: -float(r["volume_score"])):
        name = _name(r)
        table_rows.append(
            {
                "subject": _link(name, hrefs),
                "volume_score": _number(r.get("volume_score")),
                "p_value": _number(r.get("p_value")),
                "decision": "ANOMALOUS" if _flag(r) else "normal",
                "flagged_voxels": r.get("flagged_voxels"),
                "clusters": r.get("clusters"),
                "registration_dice": _number(r.get("registration_dice")),
                "quality": "; ".join(f.split(":")[0] for f in quality_flags(r))
                or ("ok" if _number(r.get("registration_dice")) is not None else "not registered"),
            }
        )
    columns = [
        "subject",
        "volume_score",
        "decision",
        "flagged_voxels",
        "clusters",
        "registration_dice",
        "quality",
    ]
    if any(r["p_value"] is not None for r in table_rows):
        columns.insert(2, "p_value")
    chosen = [r for r in table_rows if r["decision"] == "ANOMALOUS"]
    parts.append(
        html.table(chosen, columns, raw=["subject"], table_id="flagged")
        if chosen
        else '<p id="flagged">No subject was flagged.</p>'
    )
    if issues:
        parts.append("<h2>Data-quality flags</h2>")
        parts.append(
            html.table(
                [{"subject": _link(_name(r), hrefs), "flag": f} for r, f in issues],
                ["subject", "flag"],
                raw=["subject"],
                table_id="quality",
            )
        )
    if evaluation:
        parts += _evaluation_sections(evaluation, hrefs)
    parts.append(
        "<h2>All subjects</h2>" + html.table(table_rows, columns, raw=["subject"], table_id="subjects")
    )
    for uri, caption in figures:
        parts.append(html.figure(uri, caption))
    parts.append("<h2>Model</h2>" + html.definitions(model))
    return html.page(title, "\n".join(parts))


def _evaluation_sections(evaluation: Mapping[str, Any], hrefs: Mapping[str, str]) -> list[str]:
    metrics = evaluation.get("metrics", {})
    parts = ["<h2>Evaluation against the ground truth</h2>"]
    rows = []
    for key, meaning in METRIC_HELP.items():
        if key in metrics:
            ci = metrics.get(f"{key}_ci")
            rows.append(
                {
                    "metric": key,
                    "value": metrics[key],
                    "95% CI": f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "",
                    "meaning": meaning,
                }
            )
    parts.append(html.table(rows, ["metric", "value", "95% CI", "meaning"], table_id="metrics"))
    subjects = evaluation.get("subjects", [])
    if subjects:
        parts.append("<h3>Per subject</h3>")
        parts.append(
            html.table(
                [{**s, "subject": _link(s["name"], hrefs)} for s in subjects],
                [
                    "subject",
                    "kind",
                    "has_lesion",
                    "volume_score",
                    "is_anomalous",
                    "dice",
                    "n_lesions",
                    "n_detected",
                    "false_clusters",
                ],
                raw=["subject"],
                table_id="per-subject",
            )
        )
        parts.append(
            "<h3>Per lesion kind</h3>"
            + html.table(kind_table(subjects), list(kind_table(subjects)[0]), table_id="per-kind")
        )
    lesions = evaluation.get("lesions", [])
    if lesions:
        table = size_table(lesions)
        parts.append("<h3>Per lesion size</h3>" + html.table(table, list(table[0]), table_id="per-size"))
    return parts
