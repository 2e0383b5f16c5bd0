"""Optuna tuning: validated search space, nested MLflow runs, and two workers sharing one study."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import optuna
import pytest
import yaml

from anomaly3d_core.config import build_config
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.mlops.tuning import parse_search_space

SPACE = {
    "training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "autoencoder.type": {"type": "categorical", "choices": ["standard", "denoising"]},
    "autoencoder.args.latent_dim": {"type": "int", "low": 4, "high": 16},
}


def _config(tmp_path, n_trials=2):
    cfg = {
        "data": {"preprocessing": {"target_spacing": 4.0}},
        "patches": {"patch_size": 4, "stride": 2, "max_patches": 300},
        "training": {"num_epochs": 3},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "experiment_name": "tune-test"},
        "tuning": {"n_trials": n_trials, "search_space": SPACE},
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_search_space_is_validated():
    assert set(parse_search_space(build_config({"tuning": {"search_space": SPACE}}))) == set(SPACE)
    bad = {"training.learnig_rate": {"type": "float", "low": 0.1, "high": 1.0}}
    with pytest.raises(
        ConfigError, match="tuning.search_space.training.learnig_rate: .*did you mean 'learning_rate'"
    ):
        parse_search_space(build_config({"tuning": {"search_space": bad}}))
    with pytest.raises(ConfigError, match="unknown autoencoder 'stnadard'"):
        parse_search_space(
            build_config(
                {
                    "tuning": {
                        "search_space": {"autoencoder.type": {"type": "categorical", "choices": ["stnadard"]}}
                    }
                }
            )
        )
    with pytest.raises(ConfigError, match="low .* must be below high"):
        parse_search_space(
            build_config(
                {
                    "tuning": {
                        "search_space": {"training.learning_rate": {"type": "float", "low": 1, "high": 0.1}}
                    }
                }
            )
        )
    with pytest.raises(ConfigError, match="tuning.search_space"):
        parse_search_space(
            build_config(
                {
                    "tuning": {
                        "search_space": {"training.num_epochs": {"type": "integer", "low": 1, "high": 3}}
                    }
                }
            )
        )


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, demo_dir):
    cfg = _config(tmp_path, n_trials=4)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # workers on one machine share a SQLite MLflow store: create its schema once, before they start
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    mlflow.search_experiments()
    cmd = [
        sys.executable,
        "-m",
        "anomaly3d_core",
        "tune",
        "--config",
        str(cfg),
        "--train",
        str(demo_dir / "train"),
        "--storage",
        storage,
        "--study-name",
        "shared",
        "--out",
        str(tmp_path / "out"),
    ]
    workers = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    study = optuna.load_study(study_name="shared", storage=storage)
    counted = [t for t in study.trials if not t.user_attrs.get("overflow")]
    assert sorted(t.number for t in counted) == [0, 1, 2, 3]  # none lost, none duplicated
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in counted)
    assert (tmp_path / "out" / "best_config.yaml").is_file() and (
        tmp_path / "out" / "best_model" / "MLmodel"
    ).is_file()
    runs = mlflow.search_runs(experiment_names=["tune-test"], output_format="list")
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len([r for r in runs if r.info.run_name.startswith("tune-")]) == 2
    assert len(trial_runs) >= 4 and all("params" not in r.data.params for r in trial_runs)
    # trials log the figures under evaluate's names, with the data they trained and were validated on
    assert all(
        {"pixel_ap", "pixel_auc"} <= set(r.data.metrics) for r in trial_runs if r.info.status == "FINISHED"
    )
    assert all(r.data.tags["anomaly3d.autoencoder"] in ("standard", "denoising") for r in trial_runs)
    # the worker that finishes last writes the best; two that finish together may both write it
    writers = [r for r in runs if r.info.run_name.startswith("tune-") and "pixel_ap" in r.data.metrics]
    parent = writers[0]
    contexts = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in parent.inputs.dataset_inputs
    }
    assert set(contexts) == {"training", "validation"} and all(d.digest for d in contexts.values())
    version = mlflow.MlflowClient().get_model_version_by_alias("anomaly3d-shared", "champion")
    # the best model, logged to a run that wrote it
    assert version.run_id in {r.info.run_id for r in writers}


def test_a_worker_writing_the_best_waits_for_another_that_writes_it(tmp_path):
    """Two workers that finish together may both be the last and both write the study's best: the
    second used to meet the first's lock on ``best_model`` and fail at once (the cause of the
    two-worker test's failure under load, when writing takes longer); now it waits its turn."""
    import time

    from anomaly3d_core.mlops.tuning import trials_dir, write_best

    config = build_config({"tracking": {"enabled": False}})
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    dist = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    study.add_trial(
        optuna.trial.create_trial(
            params={"training.learning_rate": 0.003},
            distributions={"training.learning_rate": dist},
            value=0.5,
        )
    )
    out = tmp_path / "out"
    model = trials_dir(out, "s") / "0000"
    model.mkdir(parents=True)
    (model / "MLmodel").write_text("a model folder\n")
    holder = (  # another worker in write_best: it holds the study's lock and best_model's, for a while
        "import sys, time; from pathlib import Path; from anomaly3d_core.io.files import write_lock\n"
        "out = Path(sys.argv[1])\n"
        "with write_lock(out / 'best.json', blocking=True), write_lock(out / 'best_model'):\n"
        "    print('held', flush=True); time.sleep(2)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        best = write_best(study, config.model_dump(mode="json"), config, "s", out, "pixel_ap")
        waited = time.perf_counter() - t0
    finally:
        proc.wait(timeout=60)
    assert best.number == 0 and waited > 1.0
    assert (out / "best_model" / "MLmodel").is_file() and "0.003" in (out / "best_config.yaml").read_text()
    assert yaml.safe_load((out / "best.json").read_text())["trial"] == 0
    # once written for this trial, a later worker finds it done and leaves it as it is
    stamp = (out / "best_model" / "MLmodel").stat().st_mtime_ns
    write_best(study, config.model_dump(mode="json"), config, "s", out, "pixel_ap")
    assert (out / "best_model" / "MLmodel").stat().st_mtime_ns == stamp


def test_synthetic_anomalies_are_visible_and_found(fitted, demo_dir):
    import numpy as np

    from anomaly3d_core.demo.synthetic import inject_anomalies
    from anomaly3d_core.io.files import list_inputs, load_volume
    from anomaly3d_core.mlops.tuning import ValidationSet

    vol = load_volume(list_inputs(demo_dir / "train")[0])
    lo, hi = np.percentile(vol.array[vol.array > 0], [1, 99])
    out, mask = inject_anomalies(vol, np.random.default_rng(0), radius_mm=(8.0, 12.0))
    assert mask.any() and np.array_equal(out.array[~mask], vol.array[~mask])
    changed = out.array[mask]
    assert ((changed > hi) | (changed < lo + 0.35 * (hi - lo))).mean() > 0.9  # outside normal tissue values
    val = ValidationSet.build(list_inputs(demo_dir / "train")[:2], None, None, seed=0)
    assert val.source == "synthetic" and val.metrics(fitted)["pixel_auc"] > 0.7
