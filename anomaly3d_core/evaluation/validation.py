"""A validation that predicts the test: cross-fitting over the training normals with synthetic lesions.

Choices (route, epochs, thresholds, aggregation) made on a tuning set of two normals and large
lesions of the test's own kinds twice chose the route that then lost on the test. Here every
choice is made on *held-out normal scans* (more than two) with synthetic lesions unlike the
test's (:mod:`anomaly3d_core.evaluation.synthetic`: small, faint, diffuse, textured):

* with a separate set of normal scans, fit once on the training normals and score the set;
* without one, **cross-fit**: split the training normals into ``k`` folds, fit on ``k - 1`` and
  score the held-out fold (each scan as it is, and a corrupted copy with synthetic lesions), so
  every training normal is scored exactly once, by a model that never saw it.

The figure a route is chosen by is the pooled voxel AP over the corrupted copies (with the
clean scans' voxels as negatives too); how well it ranks routes as the test does is Spearman's
rank correlation (:func:`spearman`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

Item = TypeVar("Item")
Model = TypeVar("Model")

#: lesion-size bins (cm³) for per-lesion sensitivity: < 0.5, 0.5-5, > 5
SIZE_BINS_CM3: tuple[float, ...] = (0.5, 5.0)


def crossfit_folds(n: int, k: int = 2, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint index arrays (shuffled with ``seed``) that together cover ``range(n)``; each fold keeps a training set."""
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {k}")
    if n < k:
        raise ValueError(f"{n} training normals cannot be split into {k} folds")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def crossfit(
    items: Sequence[Item],
    fit: Callable[[list[Item]], Model],
    score: Callable[[Model, Item, int], Any],
    k: int = 2,
    seed: int = 0,
) -> list[Any]:
    """``score(model, item, index)`` for every item, by a model fitted on the other folds only.

    Returns the results in the order of ``items``.
    """
    results: list[Any] = [None] * len(items)
    for fold in crossfit_folds(len(items), k, seed):
        held = set(fold.tolist())
        model = fit([items[i] for i in range(len(items)) if i not in held])
        for i in fold:
            results[int(i)] = score(model, items[int(i)], int(i))
    return results


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan with fewer than 3 pairs or a constant side."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.shape != y.shape:
        raise ValueError(f"spearman: {x.size} values against {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def size_sensitivity(
    truths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    voxel_mm3: Sequence[float],
    bins_cm3: Sequence[float] = SIZE_BINS_CM3,
) -> dict[str, dict[str, float]]:
    """Fraction of ground-truth lesions (26-connected) a predicted mask touches, per lesion size.

    Keys: ``<0.5``, ``0.5-5``, ``>5`` (cm³, by default); each ``{"sensitivity", "n"}``.
    """
    edges = [0.0, *bins_cm3, np.inf]
    names = [f"<{edges[1]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges[1:-2], edges[2:-1], strict=True)]
    names.append(f">{edges[-2]:g}")
    found, total = np.zeros(len(names)), np.zeros(len(names))
    structure = np.ones((3, 3, 3), bool)
    for truth, pred, mm3 in zip(truths, preds, voxel_mm3, strict=True):
        labels, n = ndimage.label(truth, structure)
        if not n:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * mm3 / 1000.0
        hit = np.zeros(n + 1, bool)
        hit[np.unique(labels[pred & (labels > 0)])] = True
        where = np.searchsorted(np.asarray(edges[1:-1]), sizes, side="right")
        np.add.at(total, where, 1)
        np.add.at(found, where, hit[1:].astype(float))
    return {
        name: {"sensitivity": float(f / t) if t else float("nan"), "n": int(t)}
        for name, f, t in zip(names, found, total, strict=True)
    }


@dataclass
class ValidationScores(Generic[Item]):
    """Foreground truths and scores of the validation scans (clean normals and corrupted copies)."""

    truths: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    volume_scores: list[float] = field(default_factory=list)

    def add(self, truth: np.ndarray, scores: np.ndarray, volume_score: float) -> None:
        self.truths.append(np.asarray(truth, bool))
        self.scores.append(np.asarray(scores, np.float32))
        self.volume_scores.append(float(volume_score))

    def extend(self, other: ValidationScores) -> None:
        self.truths += other.truths
        self.scores += other.scores
        self.volume_scores += other.volume_scores

    def figures(self) -> dict[str, float]:
        """Pooled voxel AP (the figure routes are chosen by), best Dice and sample AUROC."""
        from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

        y = np.concatenate(self.truths)
        s = np.concatenate(self.scores).astype(np.float64)
        labels = [int(t.any()) for t in self.truths]
        precision, recall, _ = precision_recall_curve(y, s)
        return {
            "pixel_ap": float(average_precision_score(y, s)),
            "pixel_best_dice": float(
                np.nanmax(2 * precision * recall / np.maximum(precision + recall, 1e-12))
            ),
            "volume_auroc": float(roc_auc_score(labels, self.volume_scores))
            if 0 < sum(labels) < len(labels)
            else float("nan"),
            "n_scans": len(self.truths),
        }


__all__ = [
    "SIZE_BINS_CM3",
    "ValidationScores",
    "crossfit",
    "crossfit_folds",
    "size_sensitivity",
    "spearman",
]


def crossfit_validation(
    items: Sequence[Item],
    fit: Callable[[list[Item]], Model],
    read: Callable[[Item], dict[str, Any]],
    score: Callable[[Model, dict[str, Any]], tuple[np.ndarray, float]],
    k: int = 2,
    seed: int = 0,
    copies: int = 1,
) -> ValidationScores:
    """Cross-fitted validation figures of one route over the training normals ``items``.

    ``fit(items) -> model``; ``read(item) -> {sequence: Volume}`` (reference first, each on its own
    grid); ``score(model, volumes) -> (score map on the reference grid, volume score)``. Each
    held-out normal is scored as it is and as ``copies`` corrupted copies
    (:func:`~anomaly3d_core.evaluation.synthetic.corrupt_subject`, seeded per scan), voxels of the
    reference's foreground only.
    """
    from anomaly3d_core.evaluation.synthetic import corrupt_subject

    def one(model: Model, item: Item, index: int) -> ValidationScores:
        out: ValidationScores = ValidationScores()
        volumes = read(item)
        reference = next(iter(volumes.values()))
        fg = reference.array != 0
        smap, vs = score(model, volumes)
        out.add(np.zeros(int(fg.sum()), bool), smap[fg], vs)
        rng = np.random.default_rng([seed, index])
        for _ in range(copies):
            corrupted, truth, _ = corrupt_subject(volumes, rng)
            smap, vs = score(model, corrupted)
            out.add(truth[fg], smap[fg], vs)
        return out

    total: ValidationScores = ValidationScores()
    for part in crossfit(items, fit, one, k, seed):
        total.extend(part)
    return total


__all__ += ["crossfit_validation"]
