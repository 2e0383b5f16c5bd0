"""The synthetic-anomaly detector: its corruptions, its config, learning, and the Detector surface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly3d_core.errors import ConfigError
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.model.corruption import CorruptionSpec, corrupt, normal_variation
from anomaly3d_core.persistence import build_detector, load_any_config, load_detector
from anomaly3d_core.synthetic import SyntheticAnomalyDetector, SyntheticConfig, build_synthetic_config


def _head(shape=(24, 24, 24), channels: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A box of 'tissue' with texture inside a zero background; ``(C, X, Y, Z)`` when ``channels``."""
    rng = np.random.default_rng(seed)
    fg = np.zeros(shape, bool)
    fg[3:-3, 3:-3, 3:-3] = True
    levels = [1.0, 2.0, 0.5][: max(channels, 1)]
    arrays = [
        np.where(fg, lv * (1 + 0.05 * rng.standard_normal(shape)), 0).astype(np.float32) for lv in levels
    ]
    return (np.stack(arrays) if channels else arrays[0]), fg


# ------------------------------------------------------------------------------------------ corruption
@pytest.mark.parametrize("kind", ["foreign", "intensity", "texture", "ring"])
def test_corruption_target_lies_in_unit_range_and_only_where_changed(kind):
    x, fg = _head()
    donor, _ = _head(seed=5)
    rng = np.random.default_rng(1)
    for _ in range(5):
        y, t = corrupt(x, fg, rng, CorruptionSpec(kinds=(kind,)), donor=donor, force=True)
        assert y.shape == x.shape and t.shape == x.shape
        assert t.min() >= 0 and t.max() <= 1 and t.max() > 0
        assert not t[~fg].any(), "target outside the foreground"
        assert np.array_equal(y[~fg], x[~fg]), "background changed"
        assert np.allclose(y[t == 0], x[t == 0], atol=1e-6), "voxels changed where the target is zero"


def test_clean_fraction_leaves_samples_unchanged():
    x, fg = _head()
    y, t = corrupt(x, fg, np.random.default_rng(0), CorruptionSpec(clean_fraction=0.999999))
    assert np.array_equal(x, y) and not t.any()


def test_every_sequence_changes_in_the_same_region_with_its_physical_sign():
    x, fg = _head(channels=3)
    spec = CorruptionSpec(
        kinds=("intensity",),
        max_foci=1,
        radius_range=(3.0, 3.0),
        change_range=(0.5, 0.5),
        edge_sigma=(0.3, 0.3),
    )
    rng = np.random.default_rng(2)
    signs = {"T1w": [], "FLAIR": []}
    for _ in range(40):
        y, t = corrupt(x, fg, rng, spec, sequences=("T1w", "FLAIR", "T2w"), force=True)
        core = t > 0.5
        assert core.any()
        for c in range(3):  # the same voxels change in every channel
            assert np.abs(y[c] - x[c])[core].mean() > 0.1 * x[c][fg].mean()
        signs["T1w"].append(np.sign((y[0] - x[0])[core].mean()))
        signs["FLAIR"].append(np.sign((y[1] - x[1])[core].mean()))
    assert np.mean(np.array(signs["T1w"]) < 0) >= 0.65, "T1w changes should be mostly darker"
    assert np.mean(np.array(signs["FLAIR"]) > 0) >= 0.85, "FLAIR changes should be mostly brighter"


def test_smallest_foci_are_a_few_voxels():
    x, fg = _head()
    spec = CorruptionSpec(kinds=("intensity",), max_foci=1, radius_range=(0.3, 0.5), edge_sigma=(0.0, 0.0))
    rng = np.random.default_rng(3)
    sizes = [int((corrupt(x, fg, rng, spec, force=True)[1] > 0).sum()) for _ in range(20)]
    assert min(sizes) >= 1 and max(sizes) <= 7


def test_normal_variation_changes_only_the_foreground():
    x, fg = _head()
    y = normal_variation(x, fg, np.random.default_rng(0))
    assert np.array_equal(y[~fg], x[~fg])


# ---------------------------------------------------------------------------------------------- config
def test_config_errors_name_the_key_and_what_is_valid():
    with pytest.raises(ConfigError, match=r"synthetic\.training\.iteratons.*did you mean 'iterations'"):
        build_synthetic_config({"training": {"iteratons": 5}})
    with pytest.raises(ConfigError, match="crop_size must be a multiple of 8"):
        build_synthetic_config({"training": {"crop_size": 20}})
    with pytest.raises(ConfigError, match=r"synthetic\.network\.type.*unet"):
        build_synthetic_config({"network": {"type": "unett"}})
    with pytest.raises(ConfigError, match=r"synthetic\.network\.args\.channels"):
        build_synthetic_config({"network": {"args": {"channels": [8]}}})
    with pytest.raises(ConfigError, match="radius_range"):
        build_synthetic_config({"corruption": {"radius_range": [3, 1]}})
    with pytest.raises(ConfigError, match="corruption.kinds"):
        build_synthetic_config({"corruption": {"kinds": ["sparkles"]}})
    with pytest.raises(ConfigError, match="corruption.normal_variation"):
        build_synthetic_config({"data": {"augmentation": {"enabled": True}}})


def test_yaml_with_a_synthetic_section_builds_this_detector(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synthetic:\n  training: {iterations: 7}\n")
    config = load_any_config(path, ["training.batch_size=3"])
    assert isinstance(config, SyntheticConfig) and config.training.iterations == 7
    assert config.training.batch_size == 3
    assert isinstance(build_detector(config), SyntheticAnomalyDetector)
    path.write_text("synthetic: {}\ntraining: {num_epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"only the 'synthetic' section; move \['training'\]"):
        load_any_config(path)


# ------------------------------------------------------------------------------------------- detector
def _scans(n: int, lesion: bool = False, seed: int = 0) -> tuple[list[Volume], list[np.ndarray]]:
    """Tiny 'heads': 20³ of two smoothly mixed tissues (levels 0.6 and 1) with noise in a zero
    background; with ``lesion`` a ball of radius 3 voxels at 1.7 times the tissue it replaces."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape, inner = (28, 28, 28), (slice(4, 24),) * 3
    g = np.indices(shape)
    vols, masks = [], []
    for _ in range(n):
        mix = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        tissue = np.where(mix > 0, 1.0, 0.6) * (1 + 0.04 * rng.standard_normal(shape))
        tissue = ndimage.gaussian_filter(tissue, 0.6)
        m = np.zeros(shape, bool)
        if lesion:
            c = rng.integers(9, 19, 3)
            m = sum((g[i] - c[i]) ** 2 for i in range(3)) <= 9
            tissue = np.where(m, 1.7 * tissue, tissue)
        a = np.zeros(shape, np.float32)
        a[inner] = 100 * tissue[inner]
        vols.append(Volume(a, np.eye(4)))
        masks.append(m)
    return vols, masks


TINY = {
    "data": {"cache": False, "preprocessing": {"target_spacing": None}},
    "network": {"args": {"channels": [8, 16]}},
    "corruption": {
        "kinds": ["intensity"],
        "radius_range": [1.5, 4.0],
        "change_range": [0.4, 0.8],
        "normal_variation": 0,
    },
    "validation": {"max_scans": 1},
    "training": {
        "iterations": 300,
        "crop_size": 16,
        "batch_size": 4,
        "validate_every": 100,
        "learning_rate": 0.005,
    },
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def fitted() -> SyntheticAnomalyDetector:
    torch.set_num_threads(1)  # tiny tensors: a second thread only spins
    normals, _ = _scans(5, seed=1)
    return SyntheticAnomalyDetector(TINY).fit(normals)


def test_network_learns_to_find_a_clear_anomaly(fitted):
    from sklearn.metrics import average_precision_score

    vols, masks = _scans(3, lesion=True, seed=9)
    fgs = [v.array > 0 for v in vols]
    scores = np.concatenate([fitted.score(v).score_map[fg] for v, fg in zip(vols, fgs, strict=True)])
    truth = np.concatenate([m[fg] for m, fg in zip(masks, fgs, strict=True)])
    chance = truth.mean()
    ap = average_precision_score(truth, scores)
    assert ap > 10 * chance and ap > 0.3, f"AP {ap:.3f} (chance {chance:.3f})"
    assert len(fitted.history_["val_ap"]) == 3 and fitted.history_["best_iteration"][0] in (100, 200, 300)


def test_fit_score_save_load_round_trip_gives_identical_maps(fitted, tmp_path):
    scan = _scans(1, lesion=True, seed=4)[0][0]
    before = fitted.score(scan)
    fitted.save_files(tmp_path / "m")
    loaded = load_detector(tmp_path / "m")
    assert isinstance(loaded, SyntheticAnomalyDetector)
    after = loaded.score(scan)
    assert np.array_equal(before.score_map, after.score_map)
    assert before.volume_score == after.volume_score and before.threshold == after.threshold
    assert ("segmenters", "unet") in loaded.plugin_specs()


def test_several_sequences_are_channels_of_one_network():
    cfg = {
        **TINY,
        "data": {**TINY["data"], "sequences": ["T1w", "FLAIR"]},
        "training": {**TINY["training"], "iterations": 2},
    }
    normals, _ = _scans(3, seed=2)
    two = [Volume(np.stack([v.array, 2 * v.array], axis=-1), v.affine) for v in normals]
    det = SyntheticAnomalyDetector(cfg).fit(two)
    assert det.model_.in_channels == 2
    assert det.score(two[0]).score_map.shape == two[0].array.shape[:3]


def test_shipped_synthetic_presets_validate():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    one = load_any_config(configs / "brain_mri_synthetic.yaml")
    two = load_any_config(configs / "brain_mri_synthetic_multiseq.yaml")
    assert isinstance(one, SyntheticConfig) and one.data.channels == []
    assert isinstance(two, SyntheticConfig) and two.data.channels == ["T1w", "FLAIR"]
    assert set(one.corruption.kinds).isdisjoint(one.validation.kinds), "validation must use other kinds"


@pytest.mark.slow
def test_two_gloo_ranks_train_one_network(tmp_path):
    """Under torchrun each rank draws its own crops (other losses) and ends with the same weights."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_synthetic_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]
    cmd += ["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert r0["history"]["train_loss"] != r1["history"]["train_loss"]
