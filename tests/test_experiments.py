"""The shipped configs validate, and the benchmark's baselines behave."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from anomaly3d_core.config import load_config
from anomaly3d_core.ensemble import EnsembleConfig
from anomaly3d_core.io.files import list_inputs, load_volume
from anomaly3d_core.persistence import load_any_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def test_shipped_configs_validate(monkeypatch):
    monkeypatch.chdir(ROOT)
    preset = load_config(ROOT / "experiments" / "configs" / "brain_mri.yaml")
    assert preset.autoencoder.type == "denoising"
    assert preset.threshold.normative and not preset.data.preprocessing.crop_foreground
    for name in ("brain_mri_native.yaml", "brain_mri_multiscale.yaml", "tune_brain.yaml"):
        load_config(ROOT / "experiments" / "configs" / name)
    ens = load_any_config(ROOT / "experiments" / "configs" / "brain_ensemble.yaml")
    assert isinstance(ens, EnsembleConfig) and len(ens.members) == 2


def test_baselines_find_lesions(demo_dir):
    import baselines
    from sklearn.metrics import roc_auc_score

    train = [load_volume(p) for p in list_inputs(demo_dir / "train")]
    for model in (baselines.AtlasZScore(), baselines.IntensityMAD()):
        model.fit(train)
        truths, scores = [], []
        for p in list_inputs(demo_dir / "test"):
            v = load_volume(p)
            s, vs = model.score(v)
            brain = v.array > 0
            truths.append(load_volume(demo_dir / "test_masks" / p.name, allow_constant=True).array[brain] > 0)
            scores.append(s[brain])
            assert np.isfinite(vs)
        assert roc_auc_score(np.concatenate(truths), np.concatenate(scores)) > 0.6, model.name
        assert model.threshold_ > 0
