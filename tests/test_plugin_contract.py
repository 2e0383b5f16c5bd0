"""The contract in ``interfaces.py`` as the core uses it, the conformance kit's verdicts, config
semantics for component types, provenance, and serving through the loader plugins."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import textwrap
import types

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST
from pydantic import Field
from writers import WRITERS

from anomaly3d_core.config import build_config
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.interfaces import Autoencoder, FeatureExtractor, Params, VolumeLoader
from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.mlops.serving import decode_nifti
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.registry import Registry, get_plugin_manager
from anomaly3d_core.testing import ConformanceError, check_component, checks_for, parametrize_with_checks

# ------------------------------------------------------------------------------ test components


class PCAParams(Params):
    n_components: int = Field(4, ge=1)


class PCA(Autoencoder):
    """A closed-form autoencoder without hidden_dims or latent_dim."""

    name = "test_pca"
    trainable = False
    Params = PCAParams

    def __init__(self, input_dim, params=None, **kwargs):
        super().__init__(input_dim, params, **kwargs)
        self.register_buffer("mean", torch.zeros(self.input_dim))
        self.register_buffer(
            "basis", torch.zeros(min(self.params.n_components, self.input_dim), self.input_dim)
        )
        self.calls = 0

    def fit_closed_form(self, vectors):
        self.calls += 1
        self.mean.copy_(vectors.mean(0))
        _, _, vh = torch.linalg.svd(vectors - self.mean, full_matrices=False)
        self.basis.copy_(vh[: self.basis.shape[0]])

    def forward(self, x):
        z = (x - self.mean) @ self.basis.T
        return {"recon": z @ self.basis + self.mean}


class PatchOnly(PCA):
    name = "test_patch_only"
    per_feature_residual = False


class NoDefaultLayers(FeatureExtractor):
    name = "no_default_layers"
    layers = ("input",)

    def __init__(self, params=None, **kwargs):
        super().__init__(params, **kwargs)
        self.layer_channels, self.layer_strides = {"input": 1}, {"input": 1}

    def forward(self, x, layers=("input",)):
        return {"input": x}


class NeedsWidthParams(Params):
    width: int = Field(ge=1)  # no default


class NeedsWidth(NoDefaultLayers):
    name = "needs_width"
    default_layers = ("input",)
    Params = NeedsWidthParams


class NeedsWidthWithExample(NeedsWidth):
    name = "needs_width_example"

    @classmethod
    def example_params(cls):
        return {"width": 3}


class NoExampleLoader(VolumeLoader):
    name = "no_example"
    extensions = (".xyz",)

    def load(self, path):
        raise NotImplementedError


def _registry_with(*classes) -> Registry:
    module = types.ModuleType("contract_test_plugin")
    source = """
from anomaly3d_core import hookimpl

@hookimpl
def anomaly3d_register_autoencoders():
    return [c for c in CLASSES if issubclass(c, Autoencoder)]

@hookimpl
def anomaly3d_register_extractors():
    return [c for c in CLASSES if issubclass(c, FeatureExtractor)]
"""
    module.__dict__.update(CLASSES=classes, Autoencoder=Autoencoder, FeatureExtractor=FeatureExtractor)
    exec(textwrap.dedent(source), module.__dict__)
    pm = get_plugin_manager()
    pm.register(module, name="contract-test")
    return Registry(pm)


# -------------------------------------------------------------------------------------- the kit


@parametrize_with_checks([PCA, PatchOnly, NeedsWidthWithExample])
def test_kit_passes_components_with_their_own_params(component, check):
    """An autoencoder without hidden_dims/latent_dim passes; example_params() is used."""
    check(component)


def test_kit_explains_what_is_missing():
    with pytest.raises(
        ConformanceError, match=r"no_default_layers.*declares no default_layers; set default_layers"
    ):
        check_component(NoDefaultLayers)
    with pytest.raises(
        ConformanceError, match=r"provides no example file; define a classmethod example_file"
    ):
        check_component(NoExampleLoader)
    with pytest.raises(ConformanceError, match=r"needs_width.*declare a classmethod example_params\(\)"):
        check_component(NeedsWidth)
    names = [c.__name__ for c in checks_for(NoExampleLoader)]
    assert names[:2] == ["check_declaration", "check_params"] and "check_loader_example" in names


def test_kit_finds_state_outside_the_state_dict():
    class Forgetful(PCA):
        name = "forgetful"

        def fit_closed_form(self, vectors):
            self.offset = vectors.mean(0)  # a plain attribute: lost when the model is saved

        def forward(self, x):
            return {"recon": torch.zeros_like(x) + getattr(self, "offset", 0)}

    with pytest.raises(ConformanceError, match="register_buffer"):
        check_component(Forgetful)


# ------------------------------------------------------------------------ the contract in the core


def test_closed_form_autoencoder_skips_the_gradient_loop(demo_dir, monkeypatch, tmp_path):
    from anomaly3d_core import pipeline as pipeline_mod

    def no_loop(*args, **kwargs):
        raise AssertionError("a trainable = False autoencoder went through the gradient loop")

    monkeypatch.setattr(pipeline_mod, "train_autoencoder", no_loop)
    reg = _registry_with(PCA)
    cfg = {**FAST, "autoencoder": {"type": "test_pca", "args": {"n_components": 6}}}
    seen = []
    pipe = AnomalyDetectionPipeline(cfg, registry=reg).fit(
        list_inputs(demo_dir / "train"), callbacks=[lambda epoch, values: seen.append((epoch, values))]
    )
    assert pipe.model_.autoencoder.calls == 1
    assert len(pipe.history_["train_loss"]) == 1 and seen[0][0] == 0 and "val_loss" in seen[0][1]
    scan = sorted((demo_dir / "test").iterdir())[-1]
    before = pipe.score(scan).score_map
    again = AnomalyDetectionPipeline.load_files(pipe.save_files(tmp_path / "m"), registry=reg)
    np.testing.assert_allclose(again.score(scan).score_map, before, rtol=1e-5, atol=1e-6)


def test_patch_scores_for_an_autoencoder_without_per_feature_residuals():
    reg = _registry_with(PatchOnly)
    pipe = AnomalyDetectionPipeline({**FAST, "autoencoder": {"type": "test_patch_only"}}, registry=reg)
    assert pipe.build_network().voxel_residuals is False
    pipe = AnomalyDetectionPipeline(
        {**FAST, "autoencoder": {"type": "test_pca"}}, registry=_registry_with(PCA)
    )
    assert pipe.build_network().voxel_residuals is True
    voxel = {
        **FAST,
        "autoencoder": {"type": "test_patch_only"},
        "patches": {**FAST["patches"], "score_mode": "voxel"},
    }
    with pytest.raises(ConfigError, match="per_feature_residual = False"):
        AnomalyDetectionPipeline(voxel, registry=reg).build_network()


def test_extractor_without_default_layers_is_a_clear_error():
    reg = _registry_with(NoDefaultLayers)
    pipe = AnomalyDetectionPipeline({**FAST, "extractor": {"type": "no_default_layers"}}, registry=reg)
    with pytest.raises(
        ConfigError, match=r"declares no default_layers; set extractor.layers to some of \['input'\]"
    ):
        pipe.build_network()
    pipe = AnomalyDetectionPipeline(
        {**FAST, "extractor": {"type": "no_default_layers", "layers": ["input"]}}, registry=reg
    )
    assert pipe.build_network().layers == ["input"]


def test_spatial_shape_is_set_for_every_autoencoder():
    net = AnomalyDetectionPipeline(FAST).build_network()
    assert net.autoencoder.spatial_shape == (1, 4, 4, 4)


def test_extractor_channels_must_match_the_sequences():
    pipe = AnomalyDetectionPipeline({**FAST, "extractor": {"type": "identity", "args": {"in_channels": 2}}})
    with pytest.raises(ConfigError, match=r"takes 2 input channel\(s\), but data.sequences gives 1"):
        pipe.build_network()


# ------------------------------------------------------------------------------- config semantics


def test_changing_only_the_type_drops_the_previous_defaults():
    cfg = build_config({}, ["threshold.type=sigma"])
    assert (cfg.threshold.type, cfg.threshold.args) == ("sigma", {})
    cfg = build_config({"threshold": {"type": "mad"}})
    assert cfg.threshold.args == {}
    cfg = build_config({}, ["threshold.volume.method.type=mad"])
    assert cfg.threshold.volume.method.args == {}


def test_changing_the_type_keeps_the_arguments_the_new_type_declares(caplog):
    tree = {"autoencoder": {"type": "denoising", "args": {"hidden_dims": [16], "noise_factor": 0.3}}}
    cfg = build_config(tree, ["autoencoder.type=variational"])
    assert cfg.autoencoder.args == {"hidden_dims": [16]}
    cfg = build_config({"threshold": {"args": {"percentile": 99.9}}}, ["threshold.type=mad"])
    assert cfg.threshold.args == {}
    # given together with the type, the arguments are the user's, and checked
    with pytest.raises(ConfigError, match="threshold.args.percentile: unknown key 'percentile'"):
        build_config({}, ["threshold.type=sigma", "threshold.args.percentile=2"])
    assert build_config({}, ["threshold.type=sigma", "threshold.args.k=2"]).threshold.args == {"k": 2.0}


def test_cli_set_type_only(demo_dir, tmp_path, capsys):
    from anomaly3d_core.cli import main

    code = main(
        [
            "fit",
            "--train",
            str(demo_dir / "train"),
            "--out",
            str(tmp_path / "m"),
            "--set",
            "tracking.enabled=false",
        ]
        + [
            "--set",
            "training.num_epochs=1",
            "--set",
            "patches.max_patches=200",
            "--set",
            "threshold.type=sigma",
        ]
        + ["--set", "data.preprocessing.target_spacing=4", "--set", "patches.patch_size=4"]
    )
    assert code == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------- provenance


def test_saved_model_records_its_loaders(saved_model):
    inner = saved_model / "artifacts" / "pipeline"
    entries = json.loads((inner / "plugins.json").read_text())
    assert {"family": "loaders", "name": "nifti", "package": "anomaly3d"}.items() <= next(
        e for e in entries if e["family"] == "loaders"
    ).items()
    loader = next(e for e in entries if e["family"] == "loaders")
    assert loader["required"] is False and loader["extensions"] == [".nii", ".nii.gz"]
    assert all(e["required"] for e in entries if e["family"] != "loaders")


def test_a_missing_optional_loader_is_a_warning_with_the_install_hint(saved_model, tmp_path, caplog):
    from anomaly3d_core.persistence import load_detector

    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    inner = model / "artifacts" / "pipeline"
    entries = json.loads((inner / "plugins.json").read_text())
    entries.append(
        {"family": "loaders", "name": "mgh", "package": "mgh-loader", "version": "2.0", "required": False}
        | {"extensions": [".mgz"]}
    )
    (inner / "plugins.json").write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING):
        load_detector(model)
    assert "loader plugin 'mgh' from package 'mgh-loader' 2.0, which is not installed here" in caplog.text
    assert "(.mgz) here: pip install 'mgh-loader==2.0'" in caplog.text


# --------------------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def served(saved_model):
    return mlflow.pyfunc.load_model(str(saved_model))


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize(
    ("writer", "fmt"),
    [
        ("itk-nrrd", "nrrd"),
        ("itk-mha", "itk"),
        ("numpy-npz", None),
        ("itk-nrrd", None),
        ("numpy-npz", "numpy"),
    ],
)
def test_server_reads_any_loader_format(served, demo_dir, tmp_path, writer, fmt):
    scan = sorted((demo_dir / "test").iterdir())[-1]
    img = nib.load(scan)
    path = WRITERS[writer](np.asarray(img.dataobj, np.float32), img.affine, tmp_path, "scan")
    row = {"volume": [_b64(path)]} | ({"format": [fmt]} if fmt else {})
    out = served.predict(pd.DataFrame(row))
    reference = served.predict(pd.DataFrame({"volume": [_b64(scan)]}))
    score_map = decode_nifti(out.loc[0, "score_map"])
    assert score_map.shape == img.shape and np.allclose(score_map.affine, img.affine, atol=1e-4)
    assert out.loc[0, "volume_score"] == pytest.approx(reference.loc[0, "volume_score"], rel=1e-4)


def test_server_format_errors_are_one_line(served, demo_dir, tmp_path):
    from anomaly3d_core.mlops.pyfunc_model import ServingError

    scan = sorted((demo_dir / "test").iterdir())[-1]
    cases = [
        (
            {"volume": [_b64(scan)], "format": ["mgzz"]},
            "row 0: unknown format 'mgzz'; use a loader name or extension",
        ),
        ({"volume": [_b64(scan)], "format": ["dicom"]}, "row 0: format 'dicom' reads a folder of files"),
        ({"volume": [base64.b64encode(b"hello").decode()]}, "NIfTI"),
        ({"volume": [base64.b64encode(b"hello").decode()], "format": ["nrrd"]}, "row 0: "),
    ]
    for row, words in cases:
        with pytest.raises(ServingError) as err:
            served.unwrap_python_model().predict(None, pd.DataFrame(row))
        assert words in err.value.message and "\n" not in err.value.message, err.value.message
        assert "/tmp/" not in err.value.message
