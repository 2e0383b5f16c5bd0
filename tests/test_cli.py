"""The command line: outputs, exit codes (0 / 1 / 2), one-line errors, overrides."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import anomaly3d_core
from anomaly3d_core.cli import main
from anomaly3d_core.mlops.schema import SCORES_COLUMNS

FAST_SET = [
    "--set",
    "training.num_epochs=2",
    "--set",
    "patches.max_patches=300",
    "--set",
    "tracking.enabled=false",
    "--set",
    "data.preprocessing.target_spacing=4",
    "--set",
    "patches.patch_size=4",
    "--set",
    "patches.stride=2",
]


def test_plugins_lists_every_family(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("simple", "resnet50", "contractive", "yen", "dicom", "itk", "identity"):
        assert f"  {name} " in out
    installed = importlib.metadata.version("anomaly3d")
    assert f"anomaly3d {installed}" in out  # the built-in plugins' package and its installed version
    assert anomaly3d_core.__version__ == installed


def test_module_entry_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "anomaly3d_core",
            "fit",
            "--train",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
            "--set",
            "training.num_epoch=3",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "training.num_epoch: unknown key 'num_epoch'; did you mean 'num_epochs'?" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["fit", "--train", "x"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main(["nonsense"])
    assert err.value.code == 2
    assert main(["fit", "--train", str(tmp_path), "--out", "m", "--set", "autoencoder.type=variatonal"]) == 2
    assert "did you mean 'variational'" in capsys.readouterr().err


def test_empty_folder_is_an_input_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", "--train", str(tmp_path / "empty"), "--out", str(tmp_path / "m"), *FAST_SET]) == 1
    err = capsys.readouterr().err
    assert "empty" in err and "Traceback" not in err


def test_fit_score_evaluate_with_a_bad_file(demo_dir, tmp_path, capsys):
    model = tmp_path / "model"
    # --calibration: normals used for the p-values only (the training scans here, to keep it fast)
    calibration = ["--calibration", str(demo_dir / "train")]
    assert (
        main(["fit", "--train", str(demo_dir / "train"), *calibration, "--out", str(model), *FAST_SET]) == 0
    )
    assert (model / "MLmodel").is_file()
    printed = capsys.readouterr().out
    assert "data: 4 scan(s) on 1 grid(s), voxel size 4x4x4 mm, axis order RAS: all in MNI152" in printed
    # 4 calibration scans are too few for alpha 0.05: the rule in force is the uncalibrated one
    assert "calibrated on 4 normal scan(s), too few for alpha 0.05 (at least 19 needed)" in printed
    assert "a scan is flagged when top_k_mean > " in printed and "mask: threshold" in printed
    inputs = tmp_path / "inputs"
    shutil.copytree(demo_dir / "test", inputs)
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "scores"
    assert main(["score", "--model", str(model), "--input", str(inputs), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 input(s) failed" in err and "broken.nii.gz" in err
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 4 and tuple(rows[0]) == SCORES_COLUMNS
    assert {"volume_score", "volume_threshold", "p_value", "alpha", "is_anomalous", "voxel_threshold"} <= set(
        rows[0]
    )
    assert rows[0]["registration_dice"] == ""  # the demo scans are in template space: not registered
    for scan in sorted((demo_dir / "test").iterdir()):
        stem = scan.name.split(".")[0]
        score = nib.load(out / f"{stem}_score.nii.gz")
        assert score.shape == nib.load(scan).shape and np.allclose(score.affine, nib.load(scan).affine)
    assert not list(out.glob(".*"))  # no temporary files left behind
    ev = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--input",
                str(demo_dir / "test"),
                "--masks",
                str(demo_dir / "test_masks"),
                "--out",
                str(ev),
            ]
        )
        == 0
    )
    assert (
        (ev / "metrics.json").is_file()
        and (ev / "roc.png").is_file()
        and list((ev / "overlays").glob("*.png"))
    )
    assert "pixel_auc" in (ev / "summary.txt").read_text()
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["guarantee_n_normal_scans"] == 1 and metrics["guarantee_n_lesioned_scans"] == 3
    # 4 calibration scans are too few for alpha 0.05: the uncalibrated thresholds decide, and the
    # flagged fraction reports those decisions
    normal = [f["is_anomalous"] for f in metrics["files"] if not f["has_lesion"]]
    assert metrics["guarantee_normal_flagged_fraction"] == sum(normal) / len(normal)
    assert "normal_flagged_fraction" in (ev / "summary.txt").read_text()


def test_mask_grid_mismatch_reported(demo_dir, saved_model, tmp_path, capsys):
    masks = tmp_path / "masks"
    shutil.copytree(demo_dir / "test_masks", masks)
    victim = sorted(masks.iterdir())[0]
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), victim)
    code = main(
        [
            "evaluate",
            "--model",
            str(saved_model),
            "--input",
            str(demo_dir / "test"),
            "--masks",
            str(masks),
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert code == 1
    assert "mask grid (5, 5, 5) differs from the scan's" in capsys.readouterr().err


def test_plugins_keeps_a_long_name_apart_from_its_package(monkeypatch, capsys):
    from anomaly3d_core.registry import ComponentInfo, get_registry

    reg = get_registry(warn=False)
    long = ComponentInfo("steps", "clip_intensity_upper", type(reg), "my-steps", "0.1.0")
    original = reg.infos
    monkeypatch.setattr(
        reg, "infos", lambda family: [*original(family), *([long] if family == "steps" else [])]
    )
    assert main(["plugins"]) == 0
    assert "  clip_intensity_upper  my-steps 0.1.0  " in capsys.readouterr().out
