"""Networks and training: regularisers, reproducibility, save/load, dense scoring geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import FAST

from anomaly3d_core.config import TrainingConfig
from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.model.embedding import FeatureEmbedding
from anomaly3d_core.model.network import gaussian_kernel
from anomaly3d_core.model.training import train_autoencoder
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.seed_api import create_resnet_pipeline, create_simple_pipeline
from anomaly3d_plugins.autoencoders import (
    ContractiveAutoencoder,
    DenoisingAutoencoder,
    VariationalAutoencoder,
)


def test_vae_kl_positive_and_in_score():
    torch.manual_seed(0)
    vae = VariationalAutoencoder(input_dim=32, hidden_dims=[16], latent_dim=4, beta=1.0, kl_in_score=1.0)
    x = torch.randn(64, 32) * 3
    out = vae(x)
    kl = vae.kl_divergence(out)
    assert (kl > 0).all()
    _, parts = vae.loss(x, out)
    assert parts["kl"] > 0
    vae.eval()
    with torch.no_grad():
        o = vae(x)
        plain = ((o["recon"] - x) ** 2).mean(1)
        assert (vae.anomaly_score(x, o) > plain).all()


def test_contractive_penalty_positive_and_trains():
    torch.manual_seed(0)
    cae = ContractiveAutoencoder(input_dim=16, hidden_dims=[8], latent_dim=4, jacobian_weight=0.1)
    x = torch.randn(32, 16)
    assert float(cae.contractive_penalty(x).detach()) > 0
    loss, parts = cae.loss(x, cae(x))
    assert parts["jacobian"] > 0
    loss.backward()
    assert cae.encoder[0].weight.grad.abs().sum() > 0


def test_denoising_noise_forms():
    torch.manual_seed(0)
    x = torch.zeros(4, 2 * 4 * 4 * 4)
    gauss = DenoisingAutoencoder(x.shape[1], noise_factor=0.5, noise_type="gaussian").corrupt(x)
    coarse_ae = DenoisingAutoencoder(x.shape[1], noise_factor=0.5, noise_type="coarse")
    coarse_ae.spatial_shape = (2, 4, 4, 4)
    coarse = coarse_ae.corrupt(x).reshape(4, 2, 4, 4, 4)
    assert gauss.std() == pytest.approx(0.5, rel=0.2)
    # coarse noise is smooth: neighbouring voxels differ far less than i.i.d. noise does
    g = gauss.reshape(4, 2, 4, 4, 4)
    assert (coarse.diff(dim=2).abs().mean() / coarse.abs().mean()) < 0.5 * (
        g.diff(dim=2).abs().mean() / g.abs().mean()
    )


@pytest.mark.parametrize("method", ["flatten", "avg", "max", "adaptive", "mlp"])
def test_embedding_methods(method):
    patches = torch.randn(200, 3, 4, 4, 4)
    emb = FeatureEmbedding(3, (4, 4, 4), method, [32], output_dim=8).fit(patches, epochs=2)
    out = emb(patches)
    assert out.shape == (200, emb.output_dim)
    assert out.mean(0).abs().max() < 1e-3 and (out.std(0) - 1).abs().max() < 1e-2


def test_training_is_seeded_and_early_stops():
    data = torch.randn(512, 12)

    def run():
        torch.manual_seed(123)
        ae = VariationalAutoencoder(12, hidden_dims=[8], latent_dim=3)
        settings = TrainingConfig(num_epochs=4, batch_size=64, seed=7)
        return ae, train_autoencoder(ae, data, data[:64], settings, show_progress=False)

    (a, ha), (b, hb) = run(), run()
    assert ha == hb
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert ha["train_loss"][-1] < ha["train_loss"][0]
    flat = torch.zeros(256, 12)
    ae = VariationalAutoencoder(12, hidden_dims=[8], latent_dim=3)
    settings = TrainingConfig(num_epochs=50, learning_rate=1e-9, early_stopping_patience=2)
    hist = train_autoencoder(ae, flat, flat, settings, show_progress=False)
    assert len(hist["train_loss"]) < 50


class _Interrupted(Exception):
    pass


def test_interrupted_then_resumed_training_matches_an_uninterrupted_run(tmp_path):
    from anomaly3d_core.errors import ConfigError

    data = torch.randn(256, 10, generator=torch.Generator().manual_seed(0))
    # a VAE samples from the global RNG and the cosine schedule and Adam carry state: all must resume
    settings = TrainingConfig(num_epochs=4, batch_size=64, seed=1, early_stopping_patience=100)

    def network(hidden: int = 8):
        torch.manual_seed(5)
        return VariationalAutoencoder(10, hidden_dims=[hidden], latent_dim=2)

    whole = network()
    expected = train_autoencoder(whole, data, data[:64], settings, show_progress=False)

    def stop_after_two_epochs(epoch, metrics):
        if epoch == 1:
            raise _Interrupted

    checkpointed = settings.model_copy(update={"checkpoint_dir": str(tmp_path)})
    with pytest.raises(_Interrupted):
        train_autoencoder(
            network(), data, data[:64], checkpointed, callbacks=[stop_after_two_epochs], show_progress=False
        )
    last = torch.load(tmp_path / "last.pt", weights_only=True)  # plain tensors and containers only
    assert last["epoch"] == 1 and len(last["history"]["train_loss"]) == 2
    resumed = VariationalAutoencoder(10, hidden_dims=[8], latent_dim=2)  # other initial weights
    resuming = checkpointed.model_copy(update={"resume": True})
    history = train_autoencoder(resumed, data, data[:64], resuming, show_progress=False)
    assert history.keys() == expected.keys()
    for key, values in expected.items():
        assert history[key] == pytest.approx(values, rel=1e-6), key
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key
    with pytest.raises(ConfigError, match=r"last\.pt was saved from a different network") as err:
        train_autoencoder(network(hidden=6), data, data[:64], resuming, show_progress=False)
    assert "\n" not in str(err.value)


def test_gaussian_kernel_peak_and_symmetry():
    k = gaussian_kernel((5, 5, 5))
    assert k.max() == 1 and k[2, 2, 2] == 1 and torch.allclose(k, k.flip(0))


def test_save_load_bit_identical(fitted, saved_model, demo_dir):
    scan = list_inputs(demo_dir / "test")[-1]
    loaded = AnomalyDetectionPipeline.load(saved_model)
    a, meta_a = fitted.score_map(scan)
    b, meta_b = loaded.score_map(scan)
    assert np.array_equal(a, b)
    assert loaded.threshold_ == fitted.threshold_ and meta_a["volume_score"] == meta_b["volume_score"]
    assert (saved_model / "MLmodel").is_file()


def test_fixed_seed_identical_pipelines(demo_dir):
    train = list_inputs(demo_dir / "train")[:3]
    cfg = {**FAST, "training": {"num_epochs": 2}}
    a = AnomalyDetectionPipeline(cfg).fit(train, show_progress=False)
    b = AnomalyDetectionPipeline(cfg).fit(train, show_progress=False)
    scan = list_inputs(demo_dir / "test")[0]
    assert np.array_equal(a.score_map(scan)[0], b.score_map(scan)[0])


@pytest.mark.parametrize(
    ("factory", "extractor", "method"),
    [(create_simple_pipeline, "identity", "flatten"), (create_resnet_pipeline, "resnet18", "avg")],
)
def test_seed_factories_fit_and_score(factory, extractor, method, demo_dir):
    narrow = {"extractor": {"args": {"width": 8}}} if factory is create_resnet_pipeline else {}
    pipe = factory(
        patch_size=(8, 8, 8),
        training={"num_epochs": 1},
        patches={"max_patches": 100},
        tracking={"enabled": False},
        **narrow,
    )
    cfg = pipe.config  # the factory's own choices, merged with the overrides
    assert cfg.extractor.type == extractor and cfg.embedding.embedding_method == method
    assert cfg.patches.patch_size == (8, 8, 8) and cfg.patches.stride == (4, 4, 4)
    assert cfg.patches.max_patches == 100 and cfg.training.num_epochs == 1 and not cfg.tracking.enabled
    assert cfg.extractor.args == narrow.get("extractor", {}).get("args", {})
    pipe.fit(list_inputs(demo_dir / "train")[:3], show_progress=False)
    assert len(pipe.history_["train_loss"]) == 1
    scan = list_inputs(demo_dir / "test")[0]
    scores, meta = pipe.score_map(scan)
    mask = pipe.predict(scan)
    assert scores.shape == mask.shape == pipe.prepare(scan).source.shape
    assert np.isfinite(scores).all() and mask.dtype == bool


def test_score_modes_and_positional(demo_dir):
    from anomaly3d_core.errors import ConfigError

    with pytest.raises(ConfigError, match="score_mode: 'voxel' needs embedding_method 'flatten'"):
        AnomalyDetectionPipeline(
            {**FAST, "patches": {"score_mode": "voxel"}, "embedding": {"embedding_method": "avg"}}
        ).build_network()
    train = list_inputs(demo_dir / "train")
    scan = list_inputs(demo_dir / "test")[0]
    from anomaly3d_core.io.files import load_volume

    vol = load_volume(scan)
    brain = np.argwhere(vol.array > 0)
    centre = brain[len(brain) // 2]
    cube = tuple(slice(c - 2, c + 2) for c in centre)
    vol.array[cube] = 2.0 * np.percentile(vol.array[vol.array > 0], 99)  # a bright 4-voxel cube
    inside = np.zeros(vol.array.shape, bool)
    inside[cube] = True
    for mode in ("voxel", "patch"):
        cfg = {
            **FAST,
            "patches": {**FAST["patches"], "score_mode": mode},
            "embedding": {"positional_weight": 1.0},
        }
        pipe = AnomalyDetectionPipeline(cfg).fit(train, show_progress=False)
        assert pipe.model_.vector_dim == pipe.model_.embedding.output_dim + 3
        scores = pipe.score(vol).score_map
        assert scores[inside].mean() > np.percentile(scores[(vol.array > 0) & ~inside], 99), mode


def test_extractor_pretraining_changes_and_freezes_weights(demo_dir):
    cfg = {
        **FAST,
        "extractor": {
            "type": "simple",
            "args": {"feature_dims": [4, 8]},
            "pretrain_epochs": 2,
            "pretrain_crop": 16,
        },
        "embedding": {"embedding_method": "avg"},
        "training": {"num_epochs": 1},
    }
    pipe = AnomalyDetectionPipeline(cfg)
    from anomaly3d_core.model.training import seed_everything

    seed_everything(pipe.config.training.seed)  # the same initial weights fit() starts from
    before = {k: v.clone() for k, v in pipe.build_network().extractor.state_dict().items()}
    pipe.fit(list_inputs(demo_dir / "train"), show_progress=False)
    after = pipe.model_.extractor.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len(pipe.pretrain_history_) == 2 and all(np.isfinite(pipe.pretrain_history_))
    assert not any(p.requires_grad for p in pipe.model_.extractor.parameters())


def test_extractor_checkpoint_in_medicalnet_layout(tmp_path):
    from anomaly3d_core.errors import ConfigError
    from anomaly3d_plugins.extractors import ResNet18

    torch.manual_seed(5)
    source = ResNet18(width=8)
    ckpt = tmp_path / "resnet_18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    pipe = AnomalyDetectionPipeline(
        {
            **FAST,
            "extractor": {"type": "resnet18", "args": {"width": 8}, "checkpoint": str(ckpt)},
            "embedding": {"embedding_method": "avg"},
        }
    )
    loaded = pipe.build_network().extractor
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="has no weights matching 'resnet18'"):
        AnomalyDetectionPipeline(
            {
                **FAST,
                "extractor": {"type": "resnet18", "checkpoint": str(tmp_path / "other.pth")},
                "embedding": {"embedding_method": "avg"},
            }
        ).build_network()
    with pytest.raises(ConfigError, match="file not found"):
        AnomalyDetectionPipeline(
            {
                **FAST,
                "extractor": {"type": "resnet18", "checkpoint": str(tmp_path / "missing.pth")},
                "embedding": {"embedding_method": "avg"},
            }
        ).build_network()


@pytest.mark.parametrize("method", ["flatten", "avg", "mlp"])
def test_multiscale_embedding_blocks(method):
    torch.manual_seed(0)
    emb = FeatureEmbedding(2, (4, 4, 4), method, [16], output_dim=8, scales=[1, 2])
    assert emb.input_size == (8, 8, 8) and emb.output_dim == 2 * emb.scale_dim
    big = torch.randn(50, 2, 8, 8, 8)
    fine, coarse = emb.per_scale(big)
    assert torch.equal(fine, big[:, :, 2:6, 2:6, 2:6])  # the centred patch itself
    assert torch.allclose(coarse, torch.nn.functional.avg_pool3d(big, 2))  # the whole context, pooled
    emb.fit(big, epochs=1)
    assert emb(big).shape == (50, emb.output_dim)


def test_multiscale_pipeline_scores_on_the_same_grid(demo_dir):
    from anomaly3d_core.errors import ConfigError

    cfg = {**FAST, "patches": {**FAST["patches"], "scales": [1, 2]}}
    pipe = AnomalyDetectionPipeline(cfg).fit(list_inputs(demo_dir / "train"), show_progress=False)
    net = pipe.model_
    assert not net.voxel_residuals and net.embedding.output_dim == 2 * 4**3
    scan = list_inputs(demo_dir / "test")[-1]
    single = AnomalyDetectionPipeline(FAST)
    single.model_ = single.build_network()
    x = torch.from_numpy(pipe.prepare(scan).array)[None, None]
    grid_multi = net.grid_patches(net.features(x))[1]
    grid_single = single.model_.grid_patches(single.model_.features(x))[1]
    assert grid_multi == grid_single
    scores = pipe.score(scan).score_map
    assert scores.shape == nib.load(scan).shape and np.isfinite(scores).all() and scores.max() > 0
    with pytest.raises(ConfigError, match="single scale"):
        AnomalyDetectionPipeline(
            {**FAST, "patches": {**FAST["patches"], "scales": [1, 2], "score_mode": "voxel"}}
        ).build_network()
    with pytest.raises(ConfigError, match="scales must be distinct positive integers"):
        AnomalyDetectionPipeline({**FAST, "patches": {"scales": [0]}})


def test_one_patch_grid_for_the_network_and_extract_patches_3d():
    """The network's patches of a raw-intensity map are extract_patches_3d's, position for position,
    on grids that need padding at the far edges."""
    from anomaly3d_core.model.patches import extract_patches_3d

    net = AnomalyDetectionPipeline(FAST).build_network()  # identity extractor: the map is the input
    vol = np.random.default_rng(0).random((13, 10, 9)).astype(np.float32)
    view, grid = net.grid_patches(torch.from_numpy(vol)[None, None])
    patches = extract_patches_3d(vol, net.patch_f, net.stride_f)
    assert grid == (6, 4, 4) and len(patches.coords) == 6 * 4 * 4
    assert np.array_equal(view.reshape(-1, *net.patch_f).numpy(), patches.patches)
    # the far edge repeats the last plane: the last patch covers x = 10..13 of a 13-voxel axis
    assert tuple(patches.coords[-1]) == (10, 6, 6)
    assert np.array_equal(patches.patches[-1][3], patches.patches[-1][2])
    assert np.array_equal(patches.patches[-1][2][:, :3], vol[12, 6:10, 6:9])  # z 6..9 of 9: the last repeated
    assert np.array_equal(patches.patches[-1][2][:, 3], vol[12, 6:10, 8])
