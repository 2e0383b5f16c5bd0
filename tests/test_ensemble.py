"""Ensembles from config: normalised member scores combined on the input's grid, saved and served."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import FAST

from anomaly3d_core.cli import main
from anomaly3d_core.ensemble import EnsemblePipeline, build_ensemble_config
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.persistence import load_any_config, load_detector

MEMBERS = [
    {**FAST, "autoencoder": {"type": "standard"}},
    {**FAST, "autoencoder": {"type": "denoising", "args": {"noise_type": "coarse", "noise_factor": 0.3}}},
]


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_ensemble_combines_normalised_scores(demo_dir, combine):
    cfg = build_ensemble_config({"combine": combine, "members": MEMBERS, "tracking": {"enabled": False}})
    ens = EnsemblePipeline(cfg).fit(list_inputs(demo_dir / "train"), show_progress=False)
    scan = list_inputs(demo_dir / "test")[-1]
    result = ens.score(scan)
    assert result.score_map.shape == nib.load(scan).shape
    zs = []
    for member in ens.members:
        r = member.score(scan)
        zs.append(np.maximum(member.normalized(r.score_map), 0) * r.foreground)
    expected = np.mean(zs, 0) if combine == "mean" else np.max(zs, 0)
    inside = result.foreground & zs[0].astype(bool)
    assert np.corrcoef(result.score_map[inside], expected[inside])[0, 1] > 0.95
    assert ens.threshold_ > 0 and ens.volume_threshold_ > 0


def test_ensemble_config_errors_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="ensemble.members"):
        build_ensemble_config({"members": [MEMBERS[0]]})
    with pytest.raises(
        ConfigError, match=r"ensemble.members.1: autoencoder.type: unknown autoencoder 'denosing'"
    ):
        build_ensemble_config({"members": [MEMBERS[0], {"autoencoder": {"type": "denosing"}}]})
    member_file = tmp_path / "member.yaml"
    member_file.write_text(yaml.safe_dump(MEMBERS[1]))
    path = tmp_path / "ens.yaml"
    path.write_text(
        yaml.safe_dump({"ensemble": {"combine": "max", "members": [MEMBERS[0], str(member_file)]}})
    )
    cfg = load_any_config(path, ["training.num_epochs=1"])
    assert cfg.combine == "max" and [m.training.num_epochs for m in cfg.members] == [1, 1]
    assert cfg.members[1].autoencoder.type == "denoising"


def test_ensemble_cli_fit_score_and_pyfunc(demo_dir, tmp_path):
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump({"ensemble": {"members": MEMBERS, "tracking": {"enabled": False}}}))
    model = tmp_path / "model"
    assert (
        main(
            [
                "fit",
                "--config",
                str(path),
                "--train",
                str(demo_dir / "train"),
                "--out",
                str(model),
                "--set",
                "training.num_epochs=2",
            ]
        )
        == 0
    )
    loaded = load_detector(model)
    assert isinstance(loaded, EnsemblePipeline) and len(loaded.members) == 2
    assert (
        main(
            ["score", "--model", str(model), "--input", str(demo_dir / "test"), "--out", str(tmp_path / "s")]
        )
        == 0
    )
    assert len(list((tmp_path / "s").glob("*_score.nii.gz"))) == 4


SYNTHETIC_MEMBER = {
    "synthetic": {
        "data": {"preprocessing": {"target_spacing": 4.0}},
        "network": {"args": {"channels": [4, 8]}},
        "validation": {"max_scans": 1},
        "training": {"iterations": 3, "crop_size": 8, "batch_size": 2, "validate_every": 3},
        "tracking": {"enabled": False},
    }
}


def test_ensemble_with_a_synthetic_detector_member(demo_dir, tmp_path):
    from anomaly3d_core.synthetic import SyntheticAnomalyDetector, SyntheticConfig

    member_file = tmp_path / "syn.yaml"
    member_file.write_text(yaml.safe_dump(SYNTHETIC_MEMBER))
    cfg = build_ensemble_config({"members": [MEMBERS[0], str(member_file)], "tracking": {"enabled": False}})
    assert isinstance(cfg.members[1], SyntheticConfig) and cfg.members[1].training.iterations == 3
    again = build_ensemble_config(
        yaml.safe_load(cfg.to_yaml())["ensemble"]
    )  # the YAML keeps the member's kind
    assert isinstance(again.members[1], SyntheticConfig) and not isinstance(again.members[0], SyntheticConfig)
    ens = EnsemblePipeline(cfg).fit(list_inputs(demo_dir / "train"), show_progress=False)
    assert isinstance(ens.members[1], SyntheticAnomalyDetector)
    scan = list_inputs(demo_dir / "test")[-1]
    result = ens.score(scan)
    r = ens.members[1].score(scan)
    synthetic_z = np.maximum(ens.members[1].normalized(r.score_map), 0) * r.foreground
    assert synthetic_z.max() > 0 and result.score_map.max() > 0
    loaded = load_detector(ens.save(tmp_path / "model"))
    assert isinstance(loaded.members[1], SyntheticAnomalyDetector)
    np.testing.assert_allclose(loaded.score(scan).score_map, result.score_map, rtol=1e-5, atol=1e-6)
    bad = {"synthetic": {"training": {"iteratons": 3}}}
    with pytest.raises(ConfigError, match=r"ensemble.members.*synthetic.training.iteratons"):
        build_ensemble_config({"members": [MEMBERS[0], bad]})


def test_ensemble_overrides_go_to_the_members_that_have_the_key(tmp_path):
    cfg = build_ensemble_config(
        {"members": [MEMBERS[0], SYNTHETIC_MEMBER]},
        ["training.num_epochs=2", "training.iterations=5", "data.cache=false"],
    )
    assert cfg.members[0].training.num_epochs == 2 and cfg.members[1].training.iterations == 5
    assert cfg.members[0].data.cache is False and cfg.members[1].data.cache is False
    with pytest.raises(ConfigError, match=r"ensemble.members.0: .*training.num_epoch"):
        build_ensemble_config({"members": [MEMBERS[0], SYNTHETIC_MEMBER]}, ["training.num_epoch=2"])


def test_ensemble_with_a_synthetic_member_through_the_cli(demo_dir, tmp_path):
    """fit, score (reports included) and evaluate; member paths next to the ensemble's YAML."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "ae.yaml").write_text(yaml.safe_dump(MEMBERS[0]))
    (folder / "syn.yaml").write_text(yaml.safe_dump(SYNTHETIC_MEMBER))
    path = folder / "ens.yaml"
    path.write_text(yaml.safe_dump({"ensemble": {"members": ["ae.yaml", "syn.yaml"]}}))
    model, scores = tmp_path / "model", tmp_path / "scores"
    sets = [
        "--set",
        "training.num_epochs=2",
        "--set",
        "training.iterations=2",
        "--set",
        "tracking.enabled=false",
    ]
    fit = ["fit", "--config", str(path), "--train", str(demo_dir / "train"), "--out", str(model), *sets]
    assert main(fit) == 0
    assert (
        main(["score", "--model", str(model), "--input", str(demo_dir / "test"), "--out", str(scores)]) == 0
    )
    assert "synthetic" in (scores / "report.html").read_text(encoding="utf-8") or any(
        "synthetic" in f.read_text(encoding="utf-8") for f in scores.rglob("*.html")
    )
    evaluate = [
        "evaluate",
        "--model",
        str(model),
        "--input",
        str(demo_dir / "test"),
        "--out",
        str(tmp_path / "e"),
    ]
    assert main([*evaluate, "--masks", str(demo_dir / "test_masks")]) == 0
