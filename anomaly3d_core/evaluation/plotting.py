"""Matplotlib figures (PNG): curves, distributions, threshold analysis and three-plane overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

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


def _save(fig: plt.Figure, save_path: str | Path | None) -> plt.Figure:
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig


def plot_roc_curves(
    results: Sequence[Curve], save_path: str | Path | None = None, title: str = "Voxel ROC"
) -> plt.Figure:
    """Seed API: one ROC curve per ``(name, ground_truth, scores)``."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, gt, scores in results:
        g, s = _pooled(gt, scores)
        fpr, tpr, _ = roc_curve(g, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return _save(fig, save_path)


def plot_precision_recall_curves(
    results: Sequence[Curve], save_path: str | Path | None = None, title: str = "Voxel precision-recall"
) -> plt.Figure:
    """Seed API: one PR curve per ``(name, ground_truth, scores)``."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, gt, scores in results:
        g, s = _pooled(gt, scores)
        precision, recall, _ = precision_recall_curve(g, s)
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(g, s):.3f})")
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
    analysis: dict[str, np.ndarray], save_path: str | Path | None = None
) -> plt.Figure:
    """Seed API: plot the output of :func:`thresholding.multi_threshold_analysis`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    t = analysis["thresholds"]
    ax.plot(t, analysis["fraction_flagged"], label="fraction flagged")
    for key in ("dice", "precision", "recall"):
        if key in analysis:
            ax.plot(t, analysis[key], label=key)
    ax.set(xlabel="threshold", ylabel="value", title="Threshold analysis")
    ax.legend()
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
) -> plt.Figure:
    """Axial, coronal and sagittal slices through the highest score: scan, heat map and contours."""
    centre = np.unravel_index(int(np.argmax(scores)), scores.shape)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    hi = float(np.percentile(scores[scores > 0], 99.5)) if (scores > 0).any() else 1.0
    for ax, axis, name in zip(axes, (2, 1, 0), ("axial", "coronal", "sagittal"), strict=True):

        def cut(a: np.ndarray, axis: int = axis) -> np.ndarray:
            return np.take(a, centre[axis], axis=axis).T

        ax.imshow(cut(image), cmap="gray", origin="lower")
        heat = np.ma.masked_less_equal(cut(scores), 0.05 * hi)
        ax.imshow(heat, cmap="hot", alpha=0.5, origin="lower", vmin=0, vmax=hi)
        if predicted is not None and cut(predicted.astype(float)).any():
            ax.contour(cut(predicted.astype(float)), levels=[0.5], colors="cyan", linewidths=1)
        if truth is not None and cut(truth.astype(float)).any():
            ax.contour(cut(truth.astype(float)), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"{name} {centre[axis]}")
        ax.axis("off")
    fig.suptitle(f"{title}  (cyan: predicted, green: truth)" if title else "cyan: predicted, green: truth")
    return _save(fig, save_path)
