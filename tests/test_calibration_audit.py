"""The audit of calibrated decisions (issue 23): each result says which rule decided it, warnings and
summaries describe the calibration actually used, failed rows carry no decision, and the guarantee
figures are complete."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_calibration import FG, SHAPE, calibrated, noise_map

from anomaly3d_core.cli import main
from anomaly3d_core.postprocess.calibration import last_calibration_warns
from anomaly3d_core.postprocess.verdict import CALIBRATED_RULE, UNCALIBRATED_RULE

FAST_SET = [
    *("--set", "training.num_epochs=2", "--set", "patches.max_patches=300"),
    *("--set", "tracking.enabled=false", "--set", "data.preprocessing.target_spacing=4"),
    *("--set", "patches.patch_size=4", "--set", "patches.stride=2"),
]
WARNING = "calibration normal scan(s)"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


# ---------------------------------------------------------------------- 1: one warning, for the set used
def test_only_the_last_calibration_warns(caplog):
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING), last_calibration_warns():
        calibrated(rng, 3)  # a validation split, replaced by the calibration set below
        calibrated(rng, 19)
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING), last_calibration_warns():
        calibrated(rng, 3)
        with last_calibration_warns():  # nested: the outermost block decides
            calibrated(rng, 1)
    assert len(_warnings(caplog)) == 1 and _warnings(caplog)[0].startswith("1 calibration normal scan(s)")


def _calibration_folder(demo_dir: Path, tmp_path: Path, n: int) -> Path:
    scans = sorted((demo_dir / "train").glob("*.nii.gz"))
    folder = tmp_path / f"cal{n}"
    folder.mkdir()
    for i in range(n):  # copies of the training normals: the warning counts scans, not their content
        shutil.copy(scans[i % len(scans)], folder / f"c{i:02d}.nii.gz")
    return folder


@pytest.mark.parametrize("n", [1, 21])
def test_fit_warns_once_for_the_calibration_set_and_prints_the_rule_in_force(
    n, demo_dir, tmp_path, caplog, capsys
):
    calibration = _calibration_folder(demo_dir, tmp_path, n)
    args = ["fit", "--train", str(demo_dir / "train"), "--calibration", str(calibration)]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--out", str(tmp_path / "m"), *FAST_SET]) == 0
    printed = capsys.readouterr().out
    if n == 1:
        assert len(_warnings(caplog)) == 1 and _warnings(caplog)[0].startswith("1 calibration normal scan(s)")
        assert "calibrated on 1 normal scan(s), too few for alpha 0.05 (at least 19 needed)" in printed
        assert "a scan is flagged when top_k_mean > " in printed and printed.rstrip().endswith(
            "mask: threshold"
        )
        assert "max_cluster_mass" not in printed and "p-value <= alpha" not in printed
    else:
        assert _warnings(caplog) == []  # the 3-scan validation split is not the calibration used
        assert "calibrated on 21 normal scan(s): a scan is flagged when its p-value <= alpha 0.05 " in printed
        assert "(max_cluster_mass > " in printed and "mask: cluster" in printed


# ---------------------------------------------------------------------- 2: decision_rule everywhere
def test_rule_summary_and_decision_rule_of_a_postprocessor():
    rng = np.random.default_rng(2)
    few, enough = calibrated(rng, 4), calibrated(rng, 19)
    assert few.decision_rule == UNCALIBRATED_RULE and few.mask_rule == "threshold"
    assert enough.decision_rule == CALIBRATED_RULE and enough.mask_rule == "cluster"
    assert f"top_k_mean > {few.volume_threshold_:.4g}" in few.rule_summary()
    assert "max_cluster_mass" in enough.rule_summary() and "mask: cluster" in enough.rule_summary()
    v = enough.verdict(noise_map(rng), FG, (1.0, 1.0, 1.0))
    assert v.decision_rule == CALIBRATED_RULE and v.is_anomalous == (v.p_value <= v.alpha)
    v = few.verdict(noise_map(rng), FG, (1.0, 1.0, 1.0))
    assert v.decision_rule == UNCALIBRATED_RULE and v.is_anomalous == (v.volume_score > v.volume_threshold)
    assert SHAPE == v.mask.shape


def test_uncalibrated_rows_say_so_in_every_output(fitted, saved_model, demo_dir, tmp_path, capsys):
    from anomaly3d_core.io.derivatives import COLUMN_DESCRIPTIONS, write_sidecar
    from anomaly3d_core.mlops.rows import score_row
    from anomaly3d_core.mlops.spark import csv_row
    from anomaly3d_core.runner import score_files

    assert not fitted.postprocessor_.decisions_calibrated  # its validation split: too few for alpha 0.05
    scans = sorted((demo_dir / "test").glob("*.nii.gz"))[:2]
    batch = score_files(fitted, scans, tmp_path / "out")
    for row in csv.DictReader(open(tmp_path / "out" / "scores.csv")):
        assert row["decision_rule"] == UNCALIBRATED_RULE
        assert row["is_anomalous"] == str(float(row["volume_score"]) > float(row["volume_threshold"]))
    write_sidecar(tmp_path / "side.json", batch.rows[0], "model", [])
    assert json.loads((tmp_path / "side.json").read_text())["DecisionRule"] == UNCALIBRATED_RULE
    assert set(COLUMN_DESCRIPTIONS["decision_rule"]["Levels"]) == {CALIBRATED_RULE, UNCALIBRATED_RULE}
    served = score_row({"path": str(scans[0])}, 0, fitted)
    assert served["decision_rule"] == UNCALIBRATED_RULE
    assert csv_row(served, tmp_path)["decision_rule"] == UNCALIBRATED_RULE  # the Spark route's row
    code = main(
        ["score", "--model", str(saved_model), "--input", str(scans[0]), "--out", str(tmp_path / "c")]
    )
    err = capsys.readouterr().err
    assert code == 0 and err.count("decisions are uncalibrated") == 1
    assert f"decisions are uncalibrated ({UNCALIBRATED_RULE}" in err


# ---------------------------------------------------------------------- 4, 5: serving
def test_failed_batch_rows_carry_no_decision():
    from anomaly3d_core.mlops.rows import failed_row
    from anomaly3d_core.mlops.schema import RESPONSE_COLUMNS

    row = failed_row({"path": "gone.nii.gz"}, 0, "file not found")
    assert tuple(row) == RESPONSE_COLUMNS and row["error"] == "file not found"
    assert row["is_anomalous"] is None and row["n_calibration"] == row["n_lesions"] == 0
    assert math.isnan(row["p_value"]) and math.isnan(row["volume_score"]) and row["decision_rule"] == ""


def test_base64_response_carries_the_decision_and_the_lesion_table(
    fitted, saved_model, demo_dir, tmp_path, monkeypatch
):
    import base64

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import get_model_info

    from anomaly3d_core.mlops.schema import INLINE_COLUMNS

    model = mlflow.pyfunc.load_model(str(saved_model))
    scan = sorted((demo_dir / "test").glob("*.nii.gz"))[-1]
    out = model.predict(pd.DataFrame({"volume": [base64.b64encode(scan.read_bytes()).decode()]}))
    assert tuple(out.columns) == INLINE_COLUMNS
    row = out.loc[0]
    assert row["decision_rule"] == UNCALIBRATED_RULE and row["scan_statistic"] == "top_k_mean"
    assert row["mask_rule"] == "threshold" and row["n_calibration"] == fitted.postprocessor_.n_calibration
    table = row["lesion_table"].splitlines()
    assert table[0].startswith("cluster\tvolume_mm3") and len(table) == 1 + row["n_lesions"]
    outputs = get_model_info(str(saved_model)).signature.outputs
    assert {c.name for c in outputs.inputs if c.required} == set(INLINE_COLUMNS)
    # a batch row that fails: no decision (null), in the pyfunc response too
    monkeypatch.setenv("ANOMALY3D_ALLOW_PATHS", "1")
    batch = model.predict(pd.DataFrame({"path": [str(tmp_path / "gone.nii.gz")], "out_dir": [str(tmp_path)]}))
    assert batch.loc[0, "error"] == "file not found" and pd.isna(batch.loc[0, "is_anomalous"])
    assert pd.isna(batch.loc[0, "p_value"]) and pd.isna(batch.loc[0, "volume_score"])


# ---------------------------------------------------------------------- 6, 7, 8: evaluation figures
def _guarantees(p_values: list[float]) -> dict:
    from anomaly3d_core.evaluation.guarantees import guarantee_metrics

    truths = [np.zeros((8, 8, 8), bool) for _ in range(4)]
    truths[2][2:4, 2:4, 2:4] = truths[3][1:7, 1:7, 1:7] = True
    masks = [t.copy() for t in truths]
    masks[0][0, 0, 0] = True  # a false cluster on a normal scan
    found = guarantee_metrics(
        truths, masks, [True, False, True, True], p_values, [0.1, 0.2, 0.9, 0.8], [10.0] * 4, 0.05
    )
    return {f"guarantee_{k}": v for k, v in found.items()} | {"n_volumes": 4}


def test_summary_lists_every_guarantee_with_its_meaning():
    from anomaly3d_core.evaluator import metric_legend, summary_table

    metrics = _guarantees([0.5, 0.4, 0.01, 0.02])
    table = summary_table(metrics)
    for key in (
        "normal_scans_with_fp_cluster",
        "lesion_sensitivity_lt0.5_cm3",
        "lesion_sensitivity_0.5to5_cm3",
    ):
        assert f"guarantee_{key}" in table
    assert "guarantee_normal_scans_with_fp_cluster" in table and "0.5000" in table
    assert (
        "guarantee_lesion_sensitivity_gt5_cm3" in table and table.count("(1 lesions)") == 2
    )  # 0.08, 2.16 cm³
    legend = dict(line.split(": ", 1) for line in metric_legend(metrics).splitlines())
    figures = [k for k in metrics if k.startswith("guarantee_") and not k.endswith("_ci")]
    assert sorted(k for k in legend if k.startswith("guarantee_")) == sorted(figures)


def test_p_value_auroc_is_not_reported_without_calibration():
    from anomaly3d_core.evaluator import summary_table

    assert _guarantees([0.5, 0.4, 0.01, 0.02])["guarantee_scan_auroc_p_value"] == 1.0
    metrics = _guarantees([math.nan] * 4)  # a model saved before calibration nulls
    assert math.isnan(metrics["guarantee_scan_auroc_p_value"])
    metrics["files"] = [{"p_value": math.nan}] * 4
    line = next(x for x in summary_table(metrics).splitlines() if "scan_auroc_p_value" in x)
    assert "n/a" in line and "not calibrated" in line


def test_lesion_table_p_values_keep_significant_digits():
    from anomaly3d_core.postprocess.lesions import LESION_COLUMNS, lesion_tsv

    row = dict.fromkeys(LESION_COLUMNS, math.nan) | {"cluster": 1, "peak_p": 2.5e-9, "cluster_p": 0.047619047}
    row |= {"volume_mm3": 12.3456789}
    cells = dict(zip(LESION_COLUMNS, lesion_tsv([row]).splitlines()[1].split("\t"), strict=True))
    assert cells["peak_p"] == "2.5e-09" and cells["cluster_p"] == "0.04762"
    assert cells["volume_mm3"] == "12.345679" and cells["centre_x"] == "n/a"


# ---------------------------------------------------------------------- 10: config errors
def test_a_bad_set_value_is_blamed_on_the_set_not_the_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  num_epochs: 2\n")
    code = main(
        [
            "fit",
            "--config",
            str(config),
            "--train",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
            "--set",
            "threshold.alpha=2",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "config error: --set threshold.alpha=2: threshold.alpha: Input should be less than 1" in err
    )
    assert str(config) not in err
    config.write_text("training:\n  num_epoch: 2\n")  # the file's own mistake still names the file
    assert main(["fit", "--config", str(config), "--train", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert f"{config}: training.num_epoch: unknown key" in capsys.readouterr().err
