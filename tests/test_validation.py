"""The validation that predicts the test: cross-fitting, synthetic lesions, Spearman, size sensitivity."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly3d_core.evaluation.synthetic import (
    MAGNITUDE,
    apply_lesions,
    corrupt_subject,
    draw_lesion,
    lesion_mask,
)
from anomaly3d_core.evaluation.validation import (
    crossfit,
    crossfit_folds,
    crossfit_validation,
    size_sensitivity,
    spearman,
)
from anomaly3d_core.io.volume import Volume


def _head(shape=(40, 40, 40), spacing: float = 1.0, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.8
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2  # centred on the world origin
    return Volume(np.where(inside, 100 + rng.standard_normal(shape), 0).astype(np.float32), affine)


def test_crossfit_never_scores_a_scan_with_a_model_that_saw_it() -> None:
    items = [f"scan{i}" for i in range(7)]
    seen: list[tuple[str, frozenset]] = []

    def score(model: frozenset, item: str, index: int) -> str:
        seen.append((item, model))
        return item

    out = crossfit(items, frozenset, score, k=3, seed=4)
    assert out == items  # every scan scored once, results in the order of the items
    assert sorted(i for i, _ in seen) == sorted(items)
    assert all(item not in model for item, model in seen)
    assert all(len(model) >= 4 for _, model in seen)  # each model saw every other fold
    folds = crossfit_folds(7, 3, seed=4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(7))
    with pytest.raises(ValueError, match="cannot be split"):
        crossfit_folds(1, 2)


def test_spearman_on_known_ranks() -> None:
    assert spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4 / (5*24)
    assert spearman([0.1, 0.5, 0.3], [0.2, 0.9, 0.4]) == pytest.approx(1.0)  # ranks, not values
    assert np.isnan(spearman([1, 2], [1, 2]))


def test_size_sensitivity_bins() -> None:
    truth = np.zeros((40, 40, 40), bool)
    truth[2, 2, 2] = True  # 0.001 cm³
    truth[10:20, 10:20, 10:20] = True  # 1 cm³
    truth[22:38, 22:38, 22:38] = True  # 4.1 cm³ at 1 mm; 32.8 cm³ at 2 mm
    pred = np.zeros_like(truth)
    pred[15, 15, 15] = True
    at_1mm = size_sensitivity([truth], [pred], [1.0])
    assert at_1mm["<0.5"] == {"sensitivity": 0.0, "n": 1}
    assert at_1mm["0.5-5"] == {"sensitivity": 0.5, "n": 2}
    assert np.isnan(at_1mm[">5"]["sensitivity"])
    at_2mm = size_sensitivity([truth], [pred], [8.0])  # 8 mm³ voxels: 8 and 32.8 cm³
    assert at_2mm[">5"] == {"sensitivity": 0.5, "n": 2}


def test_synthetic_lesion_lands_at_one_world_place_on_every_grid() -> None:
    fine, coarse = _head((40, 40, 40), 1.0), _head((20, 20, 20), 2.0)
    lesion = draw_lesion(fine, ["FLAIR"], np.random.default_rng(3), kind="focus")
    lesion.foci[0].radii_mm = np.array([5.0, 5.0, 5.0])
    lesion.change = {"FLAIR": 0.5}
    masks = [lesion_mask(v, [lesion]) for v in (fine, coarse)]
    centres = [
        v.affine[:3, :3] @ np.argwhere(m).mean(0) + v.affine[:3, 3]
        for v, m in zip((fine, coarse), masks, strict=True)
    ]
    np.testing.assert_allclose(centres[0], lesion.foci[0].centre_mm, atol=0.6)
    np.testing.assert_allclose(centres[1], lesion.foci[0].centre_mm, atol=1.2)
    out = apply_lesions(fine, [lesion], "FLAIR").array
    ratio = out[masks[0]] / fine.array[masks[0]]
    assert ratio.mean() > 1.3 and (ratio >= 1.0).all()  # brighter, relative to the tissue
    idx = np.indices(fine.shape).reshape(3, -1).T
    dist = np.linalg.norm(idx @ fine.affine[:3, :3].T + fine.affine[:3, 3] - lesion.foci[0].centre_mm, axis=1)
    changed = (np.abs(out - fine.array) > 0.05 * np.abs(fine.array)).ravel()
    assert changed[dist < 4].all() and not changed[dist > 8].any()  # a soft edge, no change far away


def test_synthetic_signs_follow_physics_mostly() -> None:
    rng = np.random.default_rng(0)
    head = _head()
    changes = [draw_lesion(head, ["T1w", "FLAIR"], rng).change for _ in range(200)]
    assert np.mean([c["FLAIR"] > 0 for c in changes]) > 0.8
    assert np.mean([c["T1w"] < 0 for c in changes]) > 0.6
    assert np.mean([abs(c["T1w"]) < abs(c["FLAIR"]) for c in changes]) > 0.9  # fainter in T1w


def test_synthetic_contrasts_span_faint_to_strong() -> None:
    rng = np.random.default_rng(0)
    head = _head()
    for kind, (low, high) in MAGNITUDE.items():
        sizes = np.array([abs(draw_lesion(head, ["FLAIR"], rng, kind).change["FLAIR"]) for _ in range(300)])
        assert low <= sizes.min() and sizes.max() <= high
        # log-uniform: as many changes below the geometric mid-point as above it
        assert 0.4 < np.mean(sizes < np.sqrt(low * high)) < 0.6
        assert np.mean(sizes < 1.5 * low) > 0.1 and np.mean(sizes > high / 1.5) > 0.1  # both tails


def test_crossfit_validation_figures_rank_a_good_detector_above_a_blind_one() -> None:
    heads = [_head(seed=s) for s in range(4)]

    def deviation(model: float, volumes: dict) -> tuple[np.ndarray, float]:
        x = volumes["image"].array
        s = np.where(x != 0, np.abs(x - model), 0.0)
        return s, float(s.max())

    good = crossfit_validation(heads, lambda items: 100.0, lambda v: {"image": v}, deviation, k=2).figures()
    blind = crossfit_validation(
        heads,
        lambda items: 100.0,
        lambda v: {"image": v},
        lambda m, v: (np.random.default_rng(0).random(v["image"].shape), 0.0),
        k=2,
    ).figures()
    assert good["n_scans"] == 8  # each held-out normal clean and corrupted
    assert good["pixel_ap"] > 0.3 > blind["pixel_ap"]
    corrupted, truth, lesions = corrupt_subject({"image": heads[0]}, np.random.default_rng(1))
    assert truth.any() and 1 <= len(lesions) <= 3
