"""Tests that need CUDA (marker ``gpu``): mixed-precision fit and scoring on the GPU.

They skip on a machine without CUDA; ``experiments/gpu_check.sh`` runs them (``pytest -m gpu``)
together with the AMP, multi-GPU (NCCL) and speed checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST

from anomaly3d_core.io.files import list_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False); "
        "run experiments/gpu_check.sh on a GPU machine",
    ),
]


@pytest.fixture(scope="module")
def amp_fitted(demo_dir):
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    config = {**FAST, "training": {**FAST["training"], "use_amp": True, "device": "cuda"}}
    return AnomalyDetectionPipeline(config).fit(list_inputs(demo_dir / "train"), show_progress=False)


def test_amp_fit_lives_on_cuda_and_scores_are_finite(amp_fitted, demo_dir):
    assert amp_fitted.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in amp_fitted.model_.parameters())
    assert np.isfinite(amp_fitted.history_["train_loss"]).all()
    assert amp_fitted.history_["train_loss"][-1] < amp_fitted.history_["train_loss"][0]
    result = amp_fitted.score(list_inputs(demo_dir / "test")[0])
    assert np.isfinite(result.score_map).all() and np.isfinite(result.volume_score)
    assert result.score_map.shape == result.volume.shape


def test_cuda_model_scores_the_same_on_the_cpu(amp_fitted, demo_dir, tmp_path):
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    scan = list_inputs(demo_dir / "test")[0]
    on_cpu = AnomalyDetectionPipeline.load(amp_fitted.save(tmp_path / "model"), device="cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.model_.parameters())
    gpu, cpu = amp_fitted.score(scan), on_cpu.score(scan)  # float16 autocast on the GPU only
    brain = gpu.volume.array > 0
    assert np.corrcoef(gpu.score_map[brain], cpu.score_map[brain])[0, 1] > 0.99
    assert abs(gpu.volume_score - cpu.volume_score) <= 0.05 * max(1.0, abs(cpu.volume_score))
