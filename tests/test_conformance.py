"""Every registered component of every family meets its contract (new plugins are tested for free)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import oblique_affine
from writers import WRITERS

from anomaly3d_core.interfaces import Autoencoder, FeatureExtractor, ThresholdMethod, VolumeLoader
from anomaly3d_core.registry import get_registry

REG = get_registry()


def _small_args(cls) -> dict:
    fields = cls.Params.model_fields
    return (
        {"width": 8}
        if "width" in fields
        else ({"feature_dims": [4, 8, 8]} if "feature_dims" in fields else {})
    )


@pytest.mark.parametrize("name", REG.names("extractors"))
def test_extractor_contract(name):
    cls = REG.get("extractors", name)
    assert issubclass(cls, FeatureExtractor)
    model = cls(_small_args(cls)).eval()
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    layers = list(model.layers)
    out = model(x, layers)
    assert list(out) == layers
    for layer, fmap in out.items():
        stride = model.layer_strides[layer]
        assert fmap.shape == (2, model.layer_channels[layer], 32 // stride, 32 // stride, 32 // stride), layer
    if any(p.numel() for p in model.parameters()):
        out[layers[-1]].float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert x.grad is None or torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", REG.names("autoencoders"))
def test_autoencoder_contract(name):
    cls = REG.get("autoencoders", name)
    assert issubclass(cls, Autoencoder)
    torch.manual_seed(0)
    model = cls(24, {"hidden_dims": [16], "latent_dim": 4})
    x = torch.randn(10, 24)
    out = model(model.corrupt(x))
    assert out["recon"].shape == x.shape
    loss, parts = model.loss(x, out)
    assert loss.ndim == 0 and torch.isfinite(loss) and "recon" in parts
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        score = model.anomaly_score(x, model(x))
    assert score.shape == (10,) and (score >= 0).all()


@pytest.mark.parametrize("name", REG.names("thresholds"))
def test_threshold_contract(name):
    cls = REG.get("thresholds", name)
    assert issubclass(cls, ThresholdMethod)
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 5000), rng.normal(8, 1, 500)])
    method = cls().fit(scores)
    assert np.isfinite(method.threshold_) and scores.min() < method.threshold_ < scores.max()
    assert method.predict(np.array([scores.min(), scores.max()])).tolist() == [False, True]
    with pytest.raises(ValueError, match="no finite scores"):
        cls().fit(np.array([np.nan]))
    with pytest.raises(RuntimeError, match="not fitted"):
        cls().predict(scores)


# An example file per built-in loader, written by tests/writers.py: (writer, dtype the loader returns).
LOADER_EXAMPLES = {
    "nifti": [("nifti", np.float32)],
    "numpy": [("numpy-npy", np.float32), ("numpy-npz", np.float32)],
    "itk": [("itk-nrrd", np.float32), ("itk-mha", np.float32), ("itk-mhd", np.float32)],
    "dicom": [("dicom", np.int16)],  # a series of int16 slices, one file each
}


@pytest.mark.parametrize("name", REG.names("loaders"))
def test_loader_contract(name, tmp_path):
    cls = REG.get("loaders", name)
    assert issubclass(cls, VolumeLoader)
    assert cls.extensions and all(ext.startswith(".") and ext == ext.lower() for ext in cls.extensions)
    loader = cls()  # default params construct
    if name not in LOADER_EXAMPLES:
        assert not cls.__module__.startswith("anomaly3d_plugins"), f"built-in loader '{name}' has no example"
        pytest.skip(f"no example file for the third-party loader '{name}'")
    # integer values in a small range, so every format (int16 DICOM included) stores them exactly
    array = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 3 - 20).astype(np.float32)
    affine = oblique_affine()  # anisotropic, rotated, flipped axes
    for fmt, dtype in LOADER_EXAMPLES[name]:
        path = WRITERS[fmt](array, affine, tmp_path, f"example_{fmt}")
        assert cls.matches_extension(path) or (cls.reads_directories and path.is_dir()), fmt
        volume = loader.load(path)
        assert volume.array.shape == array.shape, fmt
        assert volume.array.dtype == dtype, fmt
        np.testing.assert_allclose(volume.affine, affine, atol=1e-5, err_msg=fmt)
        np.testing.assert_array_equal(volume.array, array.astype(dtype), err_msg=fmt)
