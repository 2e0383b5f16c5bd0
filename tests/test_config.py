"""Config validation: defaults, unknown keys with full paths, plugin args, YAML and overrides."""

from __future__ import annotations

import pytest

from anomaly3d_core.config import PipelineConfig, build_config, load_config
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.pipeline import AnomalyDetectionPipeline


def test_defaults_validate():
    cfg = build_config({})
    assert cfg.training.num_epochs > 0 and cfg.patches.patch_size == (8, 8, 8)
    assert cfg.extractor.type == "identity" and cfg.autoencoder.type == "standard"


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({"trainig": {}}, "trainig: unknown key 'trainig'; did you mean 'training'?"),
        (
            {"training": {"num_epoch": 3}},
            "training.num_epoch: unknown key 'num_epoch'; did you mean 'num_epochs'?",
        ),
        (
            {"data": {"preprocessing": {"normalise_method": "z_score"}}},
            "data.preprocessing.normalise_method: unknown key",
        ),
        (
            {"autoencoder": {"type": "variational", "args": {"latnt_dim": 4}}},
            "autoencoder.args.latnt_dim: unknown key 'latnt_dim'; did you mean 'latent_dim'?",
        ),
        (
            {"extractor": {"type": "resnet81"}},
            "extractor.type: unknown extractor 'resnet81'; did you mean 'resnet18'?",
        ),
        ({"threshold": {"type": "percentile", "args": {"percentile": 150}}}, "threshold.args.percentile"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate: Input should be greater than 0"),
        (
            {"threshold": {"volume": {"method": {"type": "sigmma"}}}},
            "threshold.volume.method.type: unknown threshold 'sigmma'; did you mean 'sigma'?",
        ),
    ],
)
def test_errors_name_the_key(tree, expected):
    with pytest.raises(ConfigError) as err:
        build_config(tree)
    assert expected in str(err.value)


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = build_config({"autoencoder": {"type": "variational", "args": {"beta": 0.5}}})
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    again = load_config(
        path, ["training.num_epochs=7", "patches.patch_size=[4, 4, 4]", "training.use_amp=true"]
    )
    assert again.autoencoder.args == {"beta": 0.5}
    assert (
        again.training.num_epochs == 7
        and again.patches.patch_size == (4, 4, 4)
        and again.training.use_amp is True
    )
    assert PipelineConfig.model_validate(again.model_dump()) == again


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    path.write_text("training:\n  num_epochs: 3\n  batch_sise: 4\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: training.batch_sise: unknown key .* did you mean 'batch_size'"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def _seed_pipeline(input_channels: int) -> AnomalyDetectionPipeline:
    return AnomalyDetectionPipeline(
        feature_extractor_config={"type": "resnet18", "args": {"in_channels": 1, "extract_features": True}},
        embedding_config={
            "input_channels": input_channels,
            "patch_size": (4, 4, 4),
            "embedding_method": "mlp",
            "mlp_hidden_dims": [256, 128],
            "output_dim": 64,
        },
        autoencoder_config={
            "type": "variational",
            "args": {"input_dim": 64, "hidden_dims": [32, 16], "latent_dim": 8, "beta": 0.5},
        },
        patch_config={
            "patch_size": (4, 4, 4),
            "stride": (2, 2, 2),
            "max_patches": 2000,
            "sampling_strategy": "random",
        },
        training_config={
            "batch_size": 64,
            "num_epochs": 150,
            "learning_rate": 1e-3,
            "scheduler_type": "cosine",
            "early_stopping_patience": 15,
        },
    )


def test_seed_dict_configs_are_accepted():
    pipe = _seed_pipeline(192)  # resnet18 layer1 + layer2: 64 + 128 channels
    cfg = pipe.config
    assert cfg.extractor.type == "resnet18" and cfg.autoencoder.args["beta"] == 0.5
    assert cfg.patches.patch_size == (4, 4, 4) and cfg.training.num_epochs == 150
    net = pipe.build_network()
    assert net.embedding.output_dim == 64 and net.autoencoder.input_dim == 64


def test_seed_parameters_are_checked_not_ignored():
    with pytest.raises(ConfigError, match=r"embedding.input_channels: 512, .* gives 192 channels"):
        _seed_pipeline(512).build_network()
    with pytest.raises(ConfigError, match="extract_features"):
        AnomalyDetectionPipeline(
            feature_extractor_config={"type": "simple", "args": {"extract_features": False}}
        )


def test_seed_dict_typo_is_caught():
    with pytest.raises(ConfigError, match="training.num_epoch: unknown key"):
        AnomalyDetectionPipeline(training_config={"num_epoch": 3})


def test_device_errors_are_clear():
    import torch

    from anomaly3d_core.model.training import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here"):
            AnomalyDetectionPipeline(device="cuda")
