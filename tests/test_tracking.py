"""MLflow as the experiment record: after `demo`, two `fit`s and `evaluate`, the tracking store holds
four readable runs with their models, data sets, plugins and metrics, and the registered model
serves by alias."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from anomaly3d_core.cli import main
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.mlops.datasets import ScanSet
from anomaly3d_core.mlops.models import parse_register
from anomaly3d_core.mlops.naming import set_name
from anomaly3d_core.mlops.serving import decode_nifti
from anomaly3d_core.mlops.tracking import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    *("--set", "training.num_epochs=2", "--set", "patches.max_patches=300"),
    *("--set", "data.preprocessing.target_spacing=4", "--set", "patches.patch_size=4"),
    *("--set", "patches.stride=2"),
]


def _context(dataset_input) -> str:
    return next(t.value for t in dataset_input.tags if t.key == "mlflow.data.context")


def test_scan_set_digest_follows_names_and_contents(tmp_path):
    a = tmp_path / "site" / "train"
    a.mkdir(parents=True)
    for i, seq in enumerate(("T1w", "FLAIR")):
        (a / f"sub-0{i}_{seq}.nii.gz").write_bytes(bytes([i]) * 100)
    first = ScanSet(sorted(a.iterdir()))
    assert first.name == "site/train" and len(first.digest) == 16
    assert first.profile["num_scans"] == 2 and first.profile["sequences"] == ["FLAIR", "T1w"]
    assert first.profile["formats"] == [".nii.gz"]
    copy = tmp_path / "elsewhere" / "train"
    shutil.copytree(a, copy)
    assert ScanSet(sorted(copy.iterdir())).digest == first.digest  # same files, same digest, wherever
    (copy / "sub-01_FLAIR.nii.gz").write_bytes(bytes([1]) * 99 + b"x")  # one byte differs
    assert ScanSet(sorted(copy.iterdir())).digest != first.digest
    (copy / "sub-01_FLAIR.nii.gz").rename(copy / "sub-02_FLAIR.nii.gz")
    renamed = ScanSet(sorted(copy.iterdir()))
    assert renamed.digest not in (first.digest, ScanSet(sorted(a.iterdir())).digest)
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "sub-00_T1w.nii.gz").write_bytes(b"m")
    with_masks = ScanSet(sorted(a.iterdir()), masks=masks)
    assert with_masks.digest != first.digest and with_masks.profile["num_masks"] == 1
    listing = with_masks.listing()
    assert [f["role"] for f in listing["files"]] == ["scan", "scan", "mask"]
    assert listing["files"][0]["sequence"] == "T1w" and len(listing["files"][0]["sha256"]) == 64
    assert set_name(tmp_path / "study" / "data" / "test") == "study/test"


def test_register_spec_is_checked():
    assert parse_register("brain") == ("brain", "champion")
    assert parse_register("brain@challenger") == ("brain", "challenger")
    assert parse_register(None) is None
    for bad in ("brain@latest", "brain@v3", "@x"):
        with pytest.raises(ConfigError, match="NAME@ALIAS"):
            parse_register(bad)


@pytest.fixture(scope="module")
def record(demo_dir, tmp_path_factory):
    """`demo`, `fit` with two configs (one registered) and `evaluate` of the demo's registered model."""
    work = tmp_path_factory.mktemp("record")
    uri = f"sqlite:///{work / 'mlruns.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # where `evaluate --model models:/...` finds the model
    try:
        shutil.copytree(demo_dir, work / "demo" / "data")  # the demo reuses data it finds
        assert main(["demo", "--out", str(work / "demo"), *FAST]) == 0
        native = ROOT / "experiments" / "configs" / "brain_mri_native.yaml"
        train = str(work / "demo" / "data" / "train")
        assert main(["fit", "--train", train, "--out", str(work / "m1"), *FAST]) == 0
        args = ["fit", "--config", str(native), "--train", train, "--out", str(work / "m2")]
        assert main([*args, "--register", "brain@challenger", *FAST]) == 0
        data = work / "demo" / "data"
        evaluate = ["evaluate", "--model", "models:/anomaly3d-demo@champion", "--input", str(data / "test")]
        assert main([*evaluate, "--masks", str(data / "test_masks"), "--out", str(work / "ev")]) == 0
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    runs = {  # keyed by the name before its --set overrides (", num_epochs=2, ... +3 more")
        r.info.run_name.split(", ")[0]: client.get_run(r.info.run_id)  # get_run: has the model inputs
        for r in mlflow.search_runs(experiment_names=["anomaly3d"], output_format="list")
    }
    return work, uri, runs


def test_the_ui_opens_on_runs_whose_models_carry_final_figures(record):
    """The experiment is a model-training one (MLflow's UI opens it on its runs); each logged model has
    its own name, the last epoch's loss and its training (and evaluation) data sets; --set overrides
    show in the run name and in full as a tag."""
    _, _, runs = record
    experiment = mlflow.get_experiment_by_name("anomaly3d")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    assert len({m.name for m in models}) == len(models) == 3
    client = mlflow.MlflowClient()
    for name in ("demo defaults on demo/train", "fit defaults on demo/train"):
        run = runs[name]
        assert run.info.run_name == f"{name}, num_epochs=2, max_patches=300 +3 more"
        assert run.data.tags["anomaly3d.overrides"].startswith(
            "training.num_epochs=2 patches.max_patches=300"
        )
        [model] = [m for m in models if m.source_run_id == run.info.run_id]
        losses = client.get_metric_history(run.info.run_id, "train_loss")
        on_model = [m for m in mlflow.get_logged_model(model.model_id).metrics if m.key == "train_loss"]
        assert len(losses) == 2 and [m.value for m in on_model] == [losses[-1].value]
        sets = {m.dataset_name for m in mlflow.get_logged_model(model.model_id).metrics if m.dataset_name}
        assert "demo/train" in sets
    demo_model = next(m for m in models if m.source_run_id == runs["demo defaults on demo/train"].info.run_id)
    sets = {m.dataset_name for m in mlflow.get_logged_model(demo_model.model_id).metrics if m.dataset_name}
    assert sets == {"demo/train", "demo/test"}  # trained on, and evaluated on


def test_four_readable_runs_with_models_datasets_and_tags(record):
    work, uri, runs = record
    assert sorted(runs) == [
        "demo defaults on demo/train",
        "evaluate defaults on demo/test",
        "fit brain_mri_native on demo/train",
        "fit defaults on demo/train",
    ]
    producers = [r for name, r in runs.items() if not name.startswith("evaluate")]
    experiment = producers[0].info.experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in producers)
    for run in producers:
        tags = run.data.tags
        assert tags["anomaly3d.command"] in ("demo", "fit")
        assert tags["anomaly3d.extractor"] == "identity" and tags["anomaly3d.threshold"]
        assert tags["anomaly3d.version"] and tags["anomaly3d.dataset"] == "demo/train"
        assert "anomaly3d==" in tags["anomaly3d.plugins"]
        inputs = {_context(d): d.dataset for d in run.inputs.dataset_inputs}
        assert {"training", "validation"} <= set(inputs)
        assert inputs["training"].profile and '"num_scans": 3' in inputs["training"].profile
        model = next(m for m in models if m.source_run_id == run.info.run_id)
        assert model.tags["anomaly3d.config"] == tags["anomaly3d.config"]
        assert {m.key for m in model.metrics} >= {"fit_seconds", "threshold", "n_train_volumes"}
    fit_default = runs["fit defaults on demo/train"]
    fit_native = runs["fit brain_mri_native on demo/train"]
    assert fit_native.data.tags["anomaly3d.config"] == "brain_mri_native.yaml"
    assert fit_native.data.params["threshold.scan_normalization"] != fit_default.data.params.get(
        "threshold.scan_normalization"
    )
    digests = {
        r.info.run_name: {_context(d): d.dataset.digest for d in r.inputs.dataset_inputs} for r in producers
    }
    # the same scans give the same digests in every run
    assert len({d["training"] for d in digests.values()}) == 1
    # the model folder names the run that logged the same model
    meta = yaml.safe_load((work / "m1" / "MLmodel").read_text())["metadata"]["anomaly3d"]
    assert meta["run_id"] == fit_default.info.run_id
    assert meta["model_id"] in {m.model_id for m in models}


def test_evaluate_links_the_model_it_evaluated(record):
    _, _, runs = record
    demo, ev = runs["demo defaults on demo/train"], runs["evaluate defaults on demo/test"]
    [demo_model] = mlflow.search_logged_models(
        experiment_ids=[demo.info.experiment_id],
        filter_string=f"source_run_id = '{demo.info.run_id}'",
        output_format="list",
    )
    assert [m.model_id for m in ev.inputs.model_inputs] == [demo_model.model_id]
    assert ev.data.tags["anomaly3d.model"] == "models:/anomaly3d-demo@champion"
    assert ev.data.tags["anomaly3d.model.run_id"] == demo.info.run_id
    [evaluation] = ev.inputs.dataset_inputs
    assert _context(evaluation) == "evaluation"
    demo_eval = next(d for d in demo.inputs.dataset_inputs if _context(d) == "evaluation")
    assert evaluation.dataset.digest == demo_eval.dataset.digest  # same scans and masks
    # the model's metrics hold both measurements on that data set, the demo's and the evaluate run's
    model = mlflow.get_logged_model(demo_model.model_id)
    auc = {m.run_id: m.value for m in model.metrics if m.key == "pixel_auc"}
    assert set(auc) == {demo.info.run_id, ev.info.run_id}
    assert auc[ev.info.run_id] == pytest.approx(auc[demo.info.run_id], abs=1e-6)


def test_metric_names_line_up_across_commands(record):
    _, _, runs = record
    final = {name: set(r.data.metrics) - {"train_loss", "val_loss", "lr"} for name, r in runs.items()}
    shared = {"pixel_ap", "pixel_auc", "pixel_best_dice", "pixel_dice", "volume_auroc", "threshold"}
    assert (
        shared <= final["demo defaults on demo/train"] and shared <= final["evaluate defaults on demo/test"]
    )
    # with the fit's 1 calibration scan alpha 0.05 is unreachable: volume_threshold is the uncalibrated one
    assert final["fit defaults on demo/train"] == {
        "fit_seconds",
        "threshold",
        "volume_threshold",
        "n_train_volumes",
        "n_val_volumes",
        "n_calibration",
    }
    assert final["fit defaults on demo/train"] <= set(METRIC_NAMES)


def test_benchmark_rows_are_runs_with_the_same_names(record, fitted, demo_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench_tracking

    from anomaly3d_core.config import build_config
    from anomaly3d_core.evaluator import evaluate_files
    from anomaly3d_core.io.files import list_inputs

    metrics, _ = evaluate_files(fitted, list_inputs(demo_dir / "test"), demo_dir / "test_masks", tmp_path)
    row = {
        "name": "fitted",
        "fit_seconds": fitted.fit_seconds_,
        "seconds_per_scan": metrics["seconds_per_volume"],
        "all": {k: metrics[k] for k in ("pixel_ap", "pixel_auc", "volume_auroc")},
        "held_out_kinds": {"pixel_ap": metrics["pixel_ap"]},
    }
    baseline = {**row, "name": "a baseline"}
    configs = {"fitted": (build_config(fitted.config.model_dump(mode="json")), "conftest")}
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = record[1]
    try:
        ids = bench_tracking.log_rows([row, baseline], configs, demo_dir, "bench-test", "benchmark")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
    mlflow.set_tracking_uri(record[1])
    logged = [mlflow.get_run(i) for i in ids]
    assert [r.info.run_name for r in logged] == ["benchmark fitted", "benchmark a baseline"]
    evaluate = record[2]["evaluate defaults on demo/test"]
    for run in logged:
        assert {"pixel_ap", "pixel_auc", "volume_auroc", "seconds_per_volume"} <= set(run.data.metrics)
        assert {"pixel_ap", "pixel_auc", "volume_auroc"} <= set(evaluate.data.metrics)
        assert run.data.metrics["held_out_pixel_ap"] == pytest.approx(metrics["pixel_ap"])
        assert {_context(d) for d in run.inputs.dataset_inputs} == {"training", "evaluation"}
    assert logged[0].data.tags["anomaly3d.autoencoder"] == fitted.config.autoencoder.type
    assert "anomaly3d.autoencoder" not in logged[1].data.tags  # a baseline has no config


def test_registered_model_serves_by_alias(record, demo_dir):
    _, uri, _ = record
    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("brain", "challenger")
    assert version.tags["anomaly3d.config"] == "brain_mri_native.yaml"
    model = mlflow.pyfunc.load_model("models:/brain@challenger")
    scan = sorted((demo_dir / "test").iterdir())[-1]
    out = model.predict(pd.DataFrame({"volume": [base64.b64encode(scan.read_bytes()).decode()]}))
    assert decode_nifti(out.loc[0, "score_map"]).shape == nib.load(scan).shape
    assert np.isfinite(out.loc[0, "volume_score"])


@pytest.mark.slow
def test_mlflow_models_serve_from_the_registry(record, demo_dir, tmp_path):
    from servers import mlflow_server, post

    _, uri, _ = record
    with mlflow_server("models:/anomaly3d-demo@champion", tmp_path, {"MLFLOW_TRACKING_URI": uri}) as port:
        scan = sorted((demo_dir / "test").iterdir())[-1]
        status, body = post(
            port, {"dataframe_records": [{"volume": base64.b64encode(scan.read_bytes()).decode()}]}
        )
        assert status == 200, body
        assert decode_nifti(body["predictions"][0]["score_map"]).shape == nib.load(scan).shape


def test_subjects_with_several_sequences_are_one_scan_each(tmp_path):
    from test_sequences import SEQS, write_bids

    write_bids(tmp_path / "study" / "train", 4)
    config = tmp_path / "seqs.yaml"
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    config.write_text(yaml.safe_dump({**SEQS, "tracking": {"tracking_uri": uri}}))
    args = ["fit", "--config", str(config), "--train", str(tmp_path / "study" / "train")]
    assert main([*args, "--out", str(tmp_path / "model")]) == 0
    mlflow.set_tracking_uri(uri)
    [run] = mlflow.search_runs(experiment_names=["anomaly3d"], output_format="list")
    assert run.info.run_name == "fit seqs on study/train"
    sets = {_context(d): d.dataset for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    training, validation = (json.loads(sets[c].profile) for c in ("training", "validation"))
    assert training["sequences"] == ["FLAIR", "T1w"] and validation["sequences"] == ["FLAIR", "T1w"]
    # 4 subjects: 3 trained on, 1 held out for calibration, two files each
    assert (training["num_scans"], training["num_files"]) == (3, 6)
    assert (validation["num_scans"], validation["num_files"]) == (1, 2)
    files = {
        c: json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/datasets/{c}.json"))["files"]
        for c in ("training", "validation")
    }
    subjects = {c: sorted(f["subject"] for f in rows) for c, rows in files.items()}
    assert len(set(subjects["training"])) == 3 and subjects["training"] == sorted(
        2 * [*set(subjects["training"])]
    )
    assert set(subjects["validation"]).isdisjoint(subjects["training"])
    assert {f["sequence"] for f in files["training"]} == {"T1w", "FLAIR"}


def test_the_printed_ui_command_names_the_runs_page():
    from anomaly3d_core.mlops.tracking import run_name, ui_command

    text = ui_command(None, "7")
    assert text.startswith("mlflow ui --backend-store-uri ")
    assert text.endswith("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert run_name("fit", "brain.yaml", "demo/train", ["training.num_epochs=5"]) == (
        "fit brain on demo/train, num_epochs=5"
    )
