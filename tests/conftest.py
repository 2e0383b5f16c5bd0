from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Sized for the 4 mm demo grid: a few seconds to fit, yet lesions are found (voxel AUROC ~0.95).
FAST = {
    "data": {"preprocessing": {"target_spacing": 4.0}},
    "training": {"num_epochs": 8, "batch_size": 256},
    "patches": {"max_patches": 1000, "patch_size": 4, "stride": 2},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo set on a 4 mm grid: 4 normal training subjects, 1 normal and 3 lesioned test subjects."""
    from anomaly3d_core.demo.datasets import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), "tiny", seed=1, voxel_size=4.0)


@pytest.fixture(scope="session")
def fitted(demo_dir: Path):
    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    return AnomalyDetectionPipeline(FAST).fit(list_inputs(demo_dir / "train"), show_progress=False)


@pytest.fixture(scope="session")
def saved_model(fitted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomaly3d_core.mlops.serving import save_pyfunc  # an MLflow model folder, as `fit --out` writes

    return save_pyfunc(fitted, tmp_path_factory.mktemp("model") / "model")


def oblique_affine() -> np.ndarray:
    """Non-canonical (LPI-like), anisotropic, rotated: the hard case for geometry round trips."""
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.2, 0.9, -2.5])
    affine[:3, 3] = [30.5, -12.25, 7.0]
    return affine


def blob_volume(shape=(28, 32, 20), seed: int = 0) -> np.ndarray:
    """A smooth 'head' with texture: non-zero inside an ellipsoid, zero outside."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.7
    return np.where(inside, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tests never read or fill the user's preprocessing cache."""
    os.environ["ANOMALY3D_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
