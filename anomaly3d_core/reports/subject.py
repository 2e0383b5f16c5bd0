"""One subject's HTML report: the decision and how sure, every flagged cluster (and, when the truth
is known, every lesion) shown in named planes, data-quality warnings and how the model was made.

Fields that a result or its ``scores.csv`` row may carry beyond today's (a scan ``p_value`` with
its ``alpha``, a voxel p-value map ``p_map``, a lesion table ``lesions``/``lesion_table``) are
shown when present and left out otherwise.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

import anomaly3d_core.reports.html as html
from anomaly3d_core.io.files import atomic_write

MAX_TARGETS = 3  # clusters (and true lesions) shown per subject, largest first
MAX_ROWS = 20  # rows of the cluster table
CALIBRATION_FIELDS = ("p_value", "alpha", "volume_threshold")  # shown when a result has them


def model_facts(detector: Any, model_uri: str = "") -> dict[str, Any]:
    """How the model was made, as the report states it: its source, components, training data
    and calibrated thresholds (what the detector and its config say; nothing is looked up)."""
    config = getattr(detector, "config", None)
    if config is None:
        members = []
    else:  # an ensemble's members, asked through the config's surface
        members = list(config.members) if config.is_ensemble else [config]
    first = members[0] if members else None
    facts: dict[str, Any] = {"model": model_uri or "(in memory)"}
    if first is not None:
        parts = [m.components() for m in members]
        kinds = " + ".join(dict.fromkeys(p["detector"] for p in parts))
        facts["detector"] = f"ensemble of {len(members)} ({kinds})" if len(members) > 1 else kinds
        for role in dict.fromkeys(r for p in parts for r in p if r != "detector"):
            facts[role] = " + ".join(dict.fromkeys(p.get(role, "-") for p in parts))
        facts["voxel threshold rule"] = config.threshold.type
        facts["registration"] = first.data.preprocessing.register_to
    facts["sequences"] = ", ".join(getattr(detector, "channels", []) or []) or "one"
    for key, label in (("n_train_volumes_", "training scans"), ("n_val_volumes_", "calibration scans")):
        if getattr(detector, key, None) is not None:
            facts[label] = getattr(detector, key)
    history = getattr(detector, "history_", None) or {}
    if history.get("train_loss"):
        facts["epochs"] = len(history["train_loss"])
        facts["final training loss"] = float(history["train_loss"][-1])
    for key, label in (("threshold_", "voxel threshold"), ("volume_threshold_", "scan threshold")):
        try:
            facts[label] = float(getattr(detector, key))
        except Exception:  # an unfitted detector has none
            continue
    return facts


def quality_flags(row: Mapping[str, Any]) -> list[str]:
    """Data-quality warnings of one ``scores.csv`` row (a poor registration, by the same limits
    that :mod:`~anomaly3d_core.preprocess.registration` warns with)."""
    from anomaly3d_core.preprocess.registration import POOR_DICE, POOR_METRIC

    flags = []
    dice, metric = _number(row.get("registration_dice")), _number(row.get("registration_metric"))
    if dice is not None and dice < POOR_DICE:
        flags.append(
            f"poor registration: brain overlap with the template (registration_dice) {dice:.3f} < {POOR_DICE}; "
            "scores of this scan compare misaligned anatomy — check the scan and its preprocessing"
        )
    if metric is not None and metric > POOR_METRIC:
        flags.append(
            f"poor registration: final mutual information (registration_metric) {metric:.3f} > {POOR_METRIC} "
            "(closer to 0 is a worse fit)"
        )
    return flags


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def decision_text(row: Mapping[str, Any]) -> str:
    """``ANOMALOUS: scan score 0.83 > threshold 0.5 (p = 0.01, alpha 0.05)``, from a scores row."""
    anomalous = str(row.get("is_anomalous")).lower() in ("true", "1")
    score, threshold = _number(row.get("volume_score")), _number(row.get("volume_threshold"))
    threshold = threshold if threshold is not None else _number(row.get("scan_threshold"))
    text = ("ANOMALOUS" if anomalous else "normal") + (
        f": scan score {score:.4g}" if score is not None else ""
    )
    if threshold is not None:
        text += f" {'>' if anomalous else '≤'} scan threshold {threshold:.4g}"
    p = _number(row.get("p_value"))
    uncalibrated = "uncalibrated" in str(row.get("decision_rule", ""))
    if p is not None:
        alpha = _number(row.get("alpha"))
        text += f" (p = {p:.3g}" + (f", alpha {alpha:g}" if alpha is not None else "")
        text += "; too few calibration scans: uncalibrated decision)" if uncalibrated else ")"
    return text


def cluster_table(
    scores: np.ndarray, mask: np.ndarray, affine: np.ndarray, truth: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """One row per flagged cluster (26-connected), largest first: size in voxels and ml, peak and mean
    score, the world (RAS mm) position of its peak, and whether it touches a true lesion."""
    labels, n = ndimage.label(np.asarray(mask) > 0, np.ones((3, 3, 3), bool))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    rows = []
    for lab in range(1, n + 1):
        inside = labels == lab
        values = np.asarray(scores)[inside]
        peak = np.unravel_index(int(np.argmax(np.where(inside, scores, -np.inf))), labels.shape)
        world = np.asarray(affine) @ np.array([*peak, 1.0])
        row = {
            "voxels": int(inside.sum()),
            "volume_ml": round(int(inside.sum()) * voxel_ml, 3),
            "peak_score": float(values.max()),
            "mean_score": float(values.mean()),
            "peak_RAS_mm": "({:.0f}, {:.0f}, {:.0f})".format(*world[:3]),
        }
        if truth is not None:
            row["on_true_lesion"] = bool(np.asarray(truth)[inside].any())
        rows.append(row)
    rows.sort(key=lambda r: -r["voxels"])
    for i, row in enumerate(rows, start=1):
        row["cluster"] = i
    return rows


def lesion_table(
    scores: np.ndarray, mask: np.ndarray, truth: np.ndarray, affine: np.ndarray, threshold: float
) -> list[dict[str, Any]]:
    """One row per true lesion: size, whether the mask touches it (detected), peak score, voxels caught."""
    labels, n = ndimage.label(np.asarray(truth) > 0, np.ones((3, 3, 3), bool))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    rows = []
    for lab in range(1, n + 1):
        inside = labels == lab
        caught = int((np.asarray(mask, bool) & inside).sum())
        rows.append(
            {
                "voxels": int(inside.sum()),
                "volume_ml": round(int(inside.sum()) * voxel_ml, 3),
                "detected": caught > 0,
                "voxels_flagged": caught,
                "peak_score": float(np.asarray(scores)[inside].max()),
                "above_threshold": float(np.asarray(scores)[inside].max()) > threshold,
            }
        )
    rows.sort(key=lambda r: -r["voxels"])
    for i, row in enumerate(rows, start=1):
        row["lesion"] = i
    return rows


def _given_lesion_table(row: Mapping[str, Any], result: Any, base: Path | None) -> list[dict[str, Any]]:
    """A lesion table the result carries (``lesions``) or names (``lesion_table``, a TSV), if any."""
    given = getattr(result, "lesions", None) or row.get("lesions")
    if isinstance(given, list):
        return [dict(r) for r in given]
    name = getattr(result, "lesion_table", None) or row.get("lesion_table")
    if name:
        path = Path(name) if base is None or Path(name).is_absolute() else base / name
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t"))
    return []


def _overlays(result: Any, sequences: Sequence[str], title: str, decision: str, truth: Any) -> list[str]:
    from anomaly3d_core.evaluation.plotting import plot_overlay
    from anomaly3d_core.evaluation.slices import targets

    out = []
    chosen = targets(result.score_map, result.mask, truth, limit=MAX_TARGETS)
    for target in chosen:
        fig = plot_overlay(
            result.volume.array,
            result.score_map,
            result.mask,
            truth,
            affine=result.volume.affine,
            sequences=sequences,
            threshold=result.threshold,
            target=target,
            title=title,
            decision=decision,
        )
        out.append(
            html.figure(
                html.png_data_uri(fig),
                f"{target.label}: slices through voxel {target.voxel} of the scan's grid",
                alt=f"{title} {target.label}",
            )
        )
    p_map = next(
        (m for m in (getattr(result, k, None) for k in ("p_map", "p_value_map")) if m is not None), None
    )
    if p_map is not None and chosen:
        logp = -np.log10(np.clip(np.asarray(p_map, dtype=np.float64), 1e-12, 1.0))
        fig = plot_overlay(
            result.volume.channel(0),
            logp,
            result.mask,
            truth,
            affine=result.volume.affine,
            sequences=sequences[:1],
            target=chosen[0],
            title=f"{title}: voxel p-values as -log10(p)",
            decision=decision,
        )
        out.append(
            html.figure(html.png_data_uri(fig), "voxel p-value map, -log10(p) (higher: less likely normal)")
        )
    return out


def subject_report(
    result: Any,
    row: Mapping[str, Any],
    name: str,
    model: Mapping[str, Any],
    *,
    sequences: Sequence[str] = (),
    truth: np.ndarray | None = None,
    group_href: str = "",
    base: Path | None = None,
) -> str:
    """The report's HTML for one scored scan (a :class:`~anomaly3d_core.detector.ScoreResult`) and
    its ``scores.csv`` row; ``truth`` adds the true lesions; ``group_href`` links the group report."""
    row = {"volume_threshold": model.get("scan threshold"), **dict(row)}
    for key in CALIBRATION_FIELDS:  # a result may carry them before its row does
        if row.get(key) in (None, "") and getattr(result, key, None) is not None:
            row[key] = getattr(result, key)
    decision = decision_text(row)
    anomalous = str(row.get("is_anomalous")).lower() in ("true", "1")
    parts = []
    if group_href:
        parts.append(f'<p><a href="{html.esc(group_href)}">← all subjects (group report)</a></p>')
    parts.append(
        f'<p><span class="decision {"anomalous" if anomalous else "normal"}" id="decision">{html.esc(decision)}</span></p>'
    )
    facts = {
        "scan": row.get("file") or name,
        "scan score": _number(row.get("volume_score")),
        "scan threshold": _number(row.get("volume_threshold")),
        "voxel threshold": float(result.threshold),
        "voxels flagged": int(np.asarray(result.mask).sum()),
    }
    for key in ("p_value", "alpha", "registration_dice", "registration_metric"):
        if _number(row.get(key)) is not None:
            facts[key] = _number(row.get(key))
    parts.append(html.definitions(facts))
    parts += [html.warning(flag) for flag in quality_flags(row)]
    clusters = cluster_table(result.score_map, result.mask, result.volume.affine, truth)
    parts.append("<h2>Flagged clusters</h2>")
    if clusters:
        columns = ["cluster", "voxels", "volume_ml", "peak_score", "mean_score", "peak_RAS_mm"]
        columns += ["on_true_lesion"] if truth is not None else []
        parts.append(html.table(clusters[:MAX_ROWS], columns, table_id="clusters"))
        if len(clusters) > MAX_ROWS:
            parts.append(f'<p class="note">… and {len(clusters) - MAX_ROWS} smaller clusters.</p>')
    else:
        parts.append("<p>No voxel is above the voxel threshold.</p>")
    given = _given_lesion_table(row, result, base)
    if given:
        parts.append("<h2>Lesion table</h2>" + html.table(given, list(given[0]), table_id="lesion-table"))
    if truth is not None:
        lesions = lesion_table(result.score_map, result.mask, truth, result.volume.affine, result.threshold)
        parts.append("<h2>Ground-truth lesions</h2>")
        parts.append(
            html.table(
                lesions,
                [
                    "lesion",
                    "voxels",
                    "volume_ml",
                    "detected",
                    "voxels_flagged",
                    "peak_score",
                    "above_threshold",
                ],
                table_id="true-lesions",
            )
            if lesions
            else "<p>No lesion in the ground truth (a normal scan).</p>"
        )
    parts.append("<h2>Slices</h2>")
    parts.append(
        '<p class="note">Each figure goes through one place: every flagged cluster at its highest score'
        + (", every true lesion at its centre" if truth is not None else "")
        + "; the highest score when nothing is flagged. One row per sequence and one of the score"
        " map; planes named after reorienting the scan to RAS, shown in the radiological convention"
        " (the patient's right on the viewer's left).</p>"
    )
    parts += _overlays(result, sequences, name, decision, truth)
    parts.append("<h2>Model</h2>" + html.definitions(model))
    return html.page(f"anomaly3d report: {name}", "\n".join(parts))


def write_subject_report(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
