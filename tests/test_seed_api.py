"""The seed README's API: patches with coordinates, feature extraction, inference helpers, data loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, blob_volume
from writers import write_nifti

from anomaly3d_core.config import TrainingConfig
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.model.embedding import FeatureEmbedding
from anomaly3d_core.model.patches import extract_patches_3d, reconstruct_from_patches
from anomaly3d_core.model.training import train_autoencoder
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.seed_api import (
    FeatureExtractor3D,
    augment_volume,
    ensemble_inference,
    inference_pipeline,
    load_and_normalize_volume,
    load_dataset,
)
from anomaly3d_plugins.autoencoders import StandardAutoencoder


def test_patches_round_trip_multiscale():
    vol = np.random.default_rng(0).random((20, 18, 13)).astype(np.float32)
    sets = extract_patches_3d(vol, patch_sizes=[(8, 8, 8), (4, 4, 4)], stride=4)
    assert [s.size for s in sets] == [(8, 8, 8), (4, 4, 4)]
    for s in sets:
        assert s.patches.shape[1:] == s.size and len(s.coords) == len(s.patches)
        i, j, k = s.coords[1]
        np.testing.assert_array_equal(
            s.patches[1], vol[i : i + s.size[0], j : j + s.size[1], k : k + s.size[2]]
        )
        rebuilt = reconstruct_from_patches(s.patches, s.coords, s.size, vol.shape)
        assert np.allclose(rebuilt, vol, atol=1e-5)  # every voxel is the same value in every patch
    one = extract_patches_3d(vol, (4, 4, 4), stride=4)
    index = reconstruct_from_patches(
        np.arange(len(one.coords), dtype=float), one.coords, one.size, vol.shape, blend="mean"
    )
    # non-overlapping 4-voxel tiles: every voxel carries the index of the one patch covering it
    assert index[0, 0, 0] == 0 and index[5, 1, 2] == list(map(tuple, one.coords)).index((4, 0, 0))


def test_patches_respect_mask():
    vol = np.zeros((16, 16, 16), np.float32)
    mask = np.zeros_like(vol, bool)
    mask[:8] = True
    ps = extract_patches_3d(vol, (8, 8, 8), stride=8, mask=mask, min_foreground=0.5)
    assert len(ps.coords) == 4 and (ps.coords[:, 0] == 0).all()


def test_feature_extractor_and_inference_pipeline():
    fx = FeatureExtractor3D("resnet18", width=8)
    feats = fx.extract_features(np.random.rand(32, 32, 32), layers=["layer2", "layer3"])
    assert feats["layer2"].shape == (16, 4, 4, 4) and feats["layer3"].shape == (32, 2, 2, 2)
    with pytest.raises(Exception, match="did you mean 'layer1'"):
        fx.extract_features(np.random.rand(16, 16, 16), layers=["layr1"])
    simple = FeatureExtractor3D("identity")
    vol = blob_volume((24, 24, 24)) / 100
    patches = torch.from_numpy(extract_patches_3d(vol, (4, 4, 4), 2).patches[:, None])
    emb = FeatureEmbedding(1, (4, 4, 4), "flatten").fit(patches)
    ae = StandardAutoencoder(emb.output_dim, hidden_dims=[32], latent_dim=8)
    history = train_autoencoder(
        ae, emb(patches).detach(), settings=TrainingConfig(num_epochs=3), show_progress=False
    )
    assert len(history["train_loss"]) == 3
    scores, meta = inference_pipeline(vol, simple, emb, ae, patch_size=(4, 4, 4), stride=(2, 2, 2))
    assert scores.shape == vol.shape and np.isfinite(scores).all() and meta["score_mode"] == "voxel"


def test_ensemble_inference(fitted, demo_dir):
    other = AnomalyDetectionPipeline({**FAST, "autoencoder": {"type": "variational"}}).fit(
        list_inputs(demo_dir / "train"), show_progress=False
    )
    scan = list_inputs(demo_dir / "test")[-1]
    combined, meta = ensemble_inference(scan, [fitted, other], combine="max")
    single = np.maximum(fitted.normalized(fitted.score(scan).score_map), 0) * fitted.score(scan).foreground
    assert combined.shape == single.shape and (combined >= single - 1e-5).all()
    assert meta["members"] == 2


def test_load_and_normalize_and_dataset(tmp_path):
    paths = [
        write_nifti(blob_volume(seed=i), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path, f"s{i}") for i in range(3)
    ]
    arr = load_and_normalize_volume(paths[0], target_shape=(16, 16, 16), normalize_method="z_score")
    assert arr.shape == (16, 16, 16)
    inside = arr > arr.min()
    assert abs(arr[inside].mean()) < 0.2
    (tmp_path / "bad.nii.gz").write_bytes(b"junk")
    vols = load_dataset(
        [*paths, tmp_path / "bad.nii.gz"],
        target_shape=(16, 16, 16),
        normalize_method="percentile",
        apply_augmentation=True,
        seed=3,
    )
    assert len(vols) == 3  # the bad file is skipped with a warning, the rest load
    again = load_dataset(
        paths, target_shape=(16, 16, 16), normalize_method="percentile", apply_augmentation=True, seed=3
    )
    assert all(np.array_equal(a, b) for a, b in zip(vols, again, strict=True))
    with pytest.raises(DataError, match="none of the 1 volumes"):
        load_dataset([tmp_path / "bad.nii.gz"])


def test_augment_volume_is_seeded_and_changes_data():
    vol = blob_volume((24, 24, 24))
    a = augment_volume(
        vol,
        rotation_range=10,
        flip_probability=0.5,
        noise_std=0.05,
        gamma_range=0.2,
        bias_field_strength=0.2,
        elastic_strength=2.0,
        rng=1,
    )
    b = augment_volume(
        vol,
        rotation_range=10,
        flip_probability=0.5,
        noise_std=0.05,
        gamma_range=0.2,
        bias_field_strength=0.2,
        elastic_strength=2.0,
        rng=1,
    )
    c = augment_volume(vol, rotation_range=10, rng=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and a.shape == vol.shape
