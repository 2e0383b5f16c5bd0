"""Signed residuals per sequence: which sign of the reconstruction residual counts, and how sequences combine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly3d_core.config import build_config
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.model.polarity import channel_signs, combine_channels, signed_residual
from anomaly3d_core.pipeline import AnomalyDetectionPipeline

SHAPE = (20, 20, 20)
SPOT = (slice(8, 13),) * 3


def _subject(seed: int, flair_factor: float = 1.0) -> dict[str, Volume]:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.9
    t1 = np.where(inside, 100 + 5 * rng.standard_normal(SHAPE), 0).astype(np.float32)
    flair = np.where(inside, 80 + 5 * rng.standard_normal(SHAPE), 0).astype(np.float32)
    flair[SPOT] *= flair_factor
    return {"T1w": Volume(t1, np.eye(4)), "FLAIR": Volume(flair, np.eye(4))}


def _config(sign: object, combine: str = "mean") -> dict:
    return {
        "data": {"sequences": ["T1w", "FLAIR"], "cache": False, "preprocessing": {"target_spacing": None}},
        "patches": {
            "patch_size": 4,
            "stride": 2,
            "max_patches": 600,
            "residual_sign": sign,
            "channel_combine": combine,
        },
        "autoencoder": {"type": "standard", "args": {"hidden_dims": [32], "latent_dim": 8}},
        "training": {"num_epochs": 6, "batch_size": 128},
        "threshold": {"smoothing_sigma": 0.0},
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def scored() -> dict[str, dict[str, float]]:
    """Spot-to-background score ratio of a bright and of a dark FLAIR spot, per residual setting."""
    train = [_subject(s) for s in range(4)]
    out: dict[str, dict[str, float]] = {}
    both = AnomalyDetectionPipeline(_config("both")).fit(train, show_progress=False)
    signed = AnomalyDetectionPipeline(_config({"FLAIR": "bright"})).fit(train, show_progress=False)
    for name, pipe in (("both", both), ("bright", signed)):
        out[name] = {}
        for spot, factor in (("bright", 1.8), ("dark", 0.2)):
            smap = pipe.score(_subject(99, factor)).score_map
            background = np.median(smap[smap > 0])
            out[name][spot] = float(smap[SPOT].mean() / background)
    return out


def test_signed_residual_drops_a_dark_flair_spot_keeps_a_bright_one(scored) -> None:
    assert scored["both"]["bright"] > 3 and scored["both"]["dark"] > 3  # unsigned: both spots stand out
    assert scored["bright"]["bright"] > 3  # FLAIR bright: the bright spot still does
    assert scored["bright"]["dark"] < 0.5 * scored["both"]["dark"]  # ... and the dark one no longer


def test_same_weights_same_map_with_both() -> None:
    """An old config (no residual_sign) and an explicit both/mean give identical maps."""
    train = [_subject(s) for s in range(3)]
    old = _config("both")
    del old["patches"]["residual_sign"], old["patches"]["channel_combine"]
    a = AnomalyDetectionPipeline(old).fit(train, show_progress=False).score(_subject(7, 1.8)).score_map
    b = (
        AnomalyDetectionPipeline(_config("both"))
        .fit(train, show_progress=False)
        .score(_subject(7, 1.8))
        .score_map
    )
    np.testing.assert_array_equal(a, b)


def test_channel_signs_and_physics_defaults() -> None:
    assert channel_signs("physics", ["T1w", "FLAIR", "T2w", "DWI"]) == ("both", "bright", "bright", "both")
    assert channel_signs({"FLAIR": "bright"}, ["T1w", "FLAIR"]) == ("both", "bright")
    assert channel_signs("dark", [], 1) == ("dark",)
    with pytest.raises(ConfigError, match="not one of data.sequences"):
        channel_signs({"T2w": "bright"}, ["T1w", "FLAIR"])


def test_signed_and_combined_by_hand() -> None:
    residual = torch.tensor([[[4.0, 9.0], [1.0, 16.0]]])  # (N=1, C=2, 2 voxels)
    diff = torch.tensor([[[2.0, -3.0], [-1.0, 4.0]]])
    kept = signed_residual(residual, diff, ("bright", "dark"))
    assert kept.tolist() == [[[4.0, 0.0], [1.0, 0.0]]]
    assert combine_channels(kept, "max").tolist() == [[4.0, 0.0]]
    assert combine_channels(residual, "mean").tolist() == [[2.5, 12.5]]


def test_config_rejects_a_mapping_without_sequences_and_unknown_names() -> None:
    with pytest.raises(ConfigError, match="needs data.sequences"):
        build_config({"patches": {"residual_sign": {"FLAIR": "bright"}}})
    with pytest.raises(ConfigError, match="not one of data.sequences"):
        build_config({"data": {"sequences": ["T1w"]}, "patches": {"residual_sign": {"FLAIR": "bright"}}})
    with pytest.raises(ConfigError, match="residual_sign"):
        build_config({"patches": {"residual_sign": "up"}})


def test_signed_needs_intensity_voxel_scoring() -> None:
    cfg = _config("bright")
    cfg["patches"]["score_mode"] = "patch"
    with pytest.raises(ConfigError, match="per-voxel residuals of the intensities"):
        AnomalyDetectionPipeline(cfg).build_network()
