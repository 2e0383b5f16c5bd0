"""Matplotlib figures (PNG): curves, distributions, threshold analysis and three-plane overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from anomaly3d_core.evaluation.slices import PLANE_LETTERS, PLANES, RasGrid, Target, plane_image, targets  # noqa: E402

Curve = tuple[str, np.ndarray | Sequence[np.ndarray], np.ndarray | Sequence[np.ndarray]]
MAX_POINTS = 2_000_000


def _pooled(
    gt: np.ndarray | Sequence[np.ndarray], scores: np.ndarray | Sequence[np.ndarray], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    g = np.concatenate([np.asarray(a).ravel() > 0 for a in ([gt] if isinstance(gt, np.ndarray) else gt)])
    s = np.concatenate(
        [
            np.asarray(a, dtype=np.float32).ravel()
            for a in ([scores] if isinstance(scores, np.ndarray) else scores)
        ]
    )
    if g.size > MAX_POINTS:  # curves only; metrics are computed on every voxel
        pick = np.random.default_rng(seed).choice(g.size, MAX_POINTS, replace=False)
        g, s = g[pick], s[pick]
    return g, s


def _save(fig: plt.Figure, save_path: str | Path | None, dpi: int = 110) -> plt.Figure:
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_path, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
    return fig


def plot_roc_curves(
    results: Sequence[Curve],
    save_path: str | Path | None = None,
    title: str = "Voxel ROC",
    reported: Sequence[float | None] | None = None,
) -> plt.Figure:
    """Seed API: one ROC curve per ``(name, ground_truth, scores)``; ``reported`` gives each curve's
    AUC as the metrics state it (computed on every voxel), so figure and summary say one number."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, (name, gt, scores) in enumerate(results):
        g, s = _pooled(gt, scores)
        fpr, tpr, _ = roc_curve(g, s)
        value = reported[i] if reported is not None and reported[i] is not None else auc(fpr, tpr)
        ax.plot(fpr, tpr, label=f"{name} (AUC {value:.4f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return _save(fig, save_path)


def plot_precision_recall_curves(
    results: Sequence[Curve],
    save_path: str | Path | None = None,
    title: str = "Voxel precision-recall",
    reported: Sequence[float | None] | None = None,
) -> plt.Figure:
    """Seed API: one PR curve per ``(name, ground_truth, scores)``; ``reported`` gives each curve's AP
    as the metrics state it (the curve itself may be drawn from a sample of the voxels)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, (name, gt, scores) in enumerate(results):
        g, s = _pooled(gt, scores)
        precision, recall, _ = precision_recall_curve(g, s)
        value = (
            reported[i] if reported is not None and reported[i] is not None else average_precision_score(g, s)
        )
        ax.plot(recall, precision, label=f"{name} (AP {value:.4f})")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper right")
    return _save(fig, save_path)


def plot_score_distributions(
    normal: np.ndarray,
    anomalous: np.ndarray,
    threshold: float | None = None,
    save_path: str | Path | None = None,
    title: str = "Voxel scores",
) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    hi = (
        float(np.percentile(np.concatenate([normal, anomalous]), 99.9))
        if normal.size + anomalous.size
        else 1.0
    )
    bins = np.linspace(float(min(normal.min(initial=0), anomalous.min(initial=0))), hi, 100)
    ax.hist(normal, bins=bins, density=True, alpha=0.6, label="normal")
    ax.hist(anomalous, bins=bins, density=True, alpha=0.6, label="anomalous")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="score", ylabel="density", title=title, yscale="log")
    ax.legend()
    return _save(fig, save_path)


def visualize_threshold_analysis(
    analysis: dict[str, np.ndarray], save_path: str | Path | None = None, threshold: float | None = None
) -> plt.Figure:
    """Seed API: plot the output of :func:`thresholding.multi_threshold_analysis`, with the model's own
    voxel ``threshold`` marked when given."""
    fig, ax = plt.subplots(figsize=(6, 4))
    t = analysis["thresholds"]
    ax.plot(t, analysis["fraction_flagged"], label="fraction flagged")
    for key in ("dice", "precision", "recall"):
        if key in analysis:
            ax.plot(t, analysis[key], label=key)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", label=f"model's threshold {threshold:.3g}")
    ax.set(xlabel="threshold", ylabel="value", title="Threshold analysis")
    ax.legend()
    return _save(fig, save_path)


def plot_volume_scores(
    names: Sequence[str],
    scores: Sequence[float],
    threshold: float | None = None,
    labels: Sequence[bool | None] | None = None,
    save_path: str | Path | None = None,
    title: str = "Scan scores",
) -> plt.Figure:
    """One dot per scan (highest score on top) against the scan-level ``threshold``; ``labels`` (has a
    lesion, or ``None`` when unknown) colour the dots."""
    order = np.argsort(np.asarray(scores, dtype=float))
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.28 * len(order) + 1.2)))
    colours = {True: ("tab:red", "lesion"), False: ("tab:blue", "normal"), None: ("0.3", "scan")}
    shown: set[str] = set()
    for y, i in enumerate(order):
        colour, what = colours[None if labels is None else labels[i]]
        ax.scatter(scores[i], y, color=colour, label=None if what in shown else what, zorder=3)
        shown.add(what)
    ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=8)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", label=f"scan threshold {threshold:.3g}")
    ax.set(xlabel="scan score (flagged when above the threshold)", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, save_path)


def plot_training_curves(history: dict[str, list[float]], save_path: str | Path | None = None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        if history.get(key):
            ax.plot(range(1, len(history[key]) + 1), history[key], label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="loss", title="Training", yscale="log")
    ax.legend()
    return _save(fig, save_path)


def plot_overlay(
    image: np.ndarray,
    scores: np.ndarray,
    predicted: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    save_path: str | Path | None = None,
    title: str = "",
    *,
    affine: np.ndarray | None = None,
    sequences: Sequence[str] = (),
    threshold: float | None = None,
    target: Target | None = None,
    decision: str = "",
    dpi: int = 110,
) -> plt.Figure:
    """Sagittal, coronal and axial slices through ``target`` (default: the first of
    :func:`~anomaly3d_core.evaluation.slices.targets`, a true lesion before a flagged cluster before
    the highest score): one row per sequence of ``image`` (3D, or 4D with sequences last) and a row of
    the score heat map with its colour bar; contours cyan (predicted) and green (truth).

    Planes are named after reorienting to RAS with ``affine`` (identity: the array is taken as RAS)
    and drawn in the radiological convention (patient's right on the viewer's left)."""
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    target = target or targets(scores, predicted, truth)[0]
    channels = [image[..., c] for c in range(image.shape[3])] if image.ndim == 4 else [image]
    if len(sequences) == len(channels):
        names = list(sequences)
    else:
        names = ["scan"] if len(channels) == 1 else [f"sequence {c + 1}" for c in range(len(channels))]
    grid = RasGrid.from_affine(affine, scores.shape)
    ras_img = [grid.array(c) for c in channels]
    ras_sc = grid.array(scores)
    ras_pred = grid.array(predicted.astype(np.float32)) if predicted is not None else None
    ras_truth = grid.array(truth.astype(np.float32)) if truth is not None else None
    centre = grid.index(target.voxel)
    positive = scores[scores > 0]
    hi = float(np.percentile(positive, 99.5)) if positive.size else 1.0
    if threshold is not None and np.isfinite(threshold):
        hi = max(hi, 1.25 * float(threshold))
    floor = 0.5 * threshold if threshold is not None and threshold > 0 else 0.05 * hi
    rows = len(channels) + 1
    fig, axes = plt.subplots(rows, 3, figsize=(11, 3.2 * rows + 0.6), squeeze=False)
    heat_im = None
    for col, plane in enumerate(PLANES):
        index = centre[PLANES.index(plane)]
        for row in range(rows):
            ax = axes[row, col]
            base, aspect = plane_image(
                ras_img[min(row, len(ras_img) - 1)] if row < len(ras_img) else ras_img[0],
                plane,
                index,
                grid.spacing,
            )
            lo_v, hi_v = np.percentile(base, (1, 99.5)) if base.size else (0, 1)
            ax.imshow(
                base,
                cmap="gray",
                origin="lower",
                aspect=aspect,
                vmin=lo_v,
                vmax=hi_v if hi_v > lo_v else lo_v + 1,
            )
            if row == rows - 1:
                heat, _ = plane_image(ras_sc, plane, index, grid.spacing)
                heat_im = ax.imshow(
                    np.ma.masked_less_equal(heat, floor),
                    cmap="hot",
                    alpha=0.6,
                    origin="lower",
                    aspect=aspect,
                    vmin=0,
                    vmax=hi,
                )
            for arr, colour in ((ras_pred, "cyan"), (ras_truth, "lime")):
                if arr is not None:
                    cut, _ = plane_image(arr, plane, index, grid.spacing)
                    if cut.any() and cut.min() != cut.max():
                        ax.contour(cut, levels=[0.5], colors=colour, linewidths=1)
            h, w = base.shape
            left, right, bottom, top = PLANE_LETTERS[plane]
            style = {"color": "yellow", "fontsize": 9, "fontweight": "bold"}
            ax.text(0.01, 0.5, left, transform=ax.transAxes, ha="left", va="center", **style)
            ax.text(0.99, 0.5, right, transform=ax.transAxes, ha="right", va="center", **style)
            ax.text(0.5, 0.01, bottom, transform=ax.transAxes, ha="center", va="bottom", **style)
            ax.text(0.5, 0.99, top, transform=ax.transAxes, ha="center", va="top", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{plane} (slice {index})")
            if col == 0:
                ax.set_ylabel(names[row] if row < len(names) else f"score on {names[0]}")
    if heat_im is not None:
        bar = fig.colorbar(heat_im, ax=list(axes[-1]), fraction=0.025, pad=0.01)
        if threshold is not None and np.isfinite(threshold) and threshold <= hi:
            bar.ax.axhline(threshold, color="cyan", lw=2)
            bar.set_label(f"anomaly score (cyan line: voxel threshold {threshold:.3g})")
        else:
            bar.set_label("anomaly score")
    what = f"{target.label}: {target.n_voxels} voxels, peak score {target.peak:.3g}"
    head = " | ".join(t for t in (title, decision) if t)
    fig.suptitle(
        (head + "\n" if head else "")
        + what
        + "\ncyan: flagged by the model, green: ground truth; radiological view (patient's right on the left)",
        fontsize=10,
    )
    return _save(fig, save_path, dpi)
