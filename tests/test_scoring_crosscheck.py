"""The hand-written Gaussian-blended dense scoring agrees with MONAI's sliding-window inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly3d_core.pipeline import AnomalyDetectionPipeline

monai_inferers = pytest.importorskip("monai.inferers", reason="MONAI is in the dev and bench extras")


def test_dense_voxel_scores_match_monai_sliding_window():
    torch.manual_seed(0)
    pipe = AnomalyDetectionPipeline(
        {
            "patches": {"patch_size": [5, 5, 5], "stride": [2, 2, 2], "score_mode": "voxel"},
            "autoencoder": {"type": "standard", "args": {"hidden_dims": [16], "latent_dim": 4}},
            "training": {"device": "cpu"},
        }
    )
    net = pipe.build_network().eval()
    volume = torch.from_numpy(np.random.default_rng(0).normal(size=(15, 17, 13)).astype(np.float32))
    ours = net.score_map(volume.numpy(), torch.device("cpu"))

    def one_patch_residuals(batch: torch.Tensor) -> torch.Tensor:
        # a window the size of one patch gives that patch's own per-voxel residuals
        return torch.stack([net.score_voxels(w[None]) for w in batch])[:, None]

    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(
            volume[None, None],
            (5, 5, 5),
            64,
            one_patch_residuals,
            overlap=0.6,
            mode="gaussian",
            sigma_scale=0.25,
        )[0, 0].numpy()
    assert ours.shape == theirs.shape == volume.shape
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(ours, theirs, rtol=0.05, atol=1e-3 * float(np.abs(theirs).max()))
