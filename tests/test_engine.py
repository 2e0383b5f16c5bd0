"""The engine's flows: fit → save, score → write, evaluate, with an injected tracker and writer."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from conftest import FAST

from anomaly3d_core.config import build_config
from anomaly3d_core.engine import Engine
from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.persistence import build_detector, load_detector, read_lineage
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.tracking import NullTracker, Tracker

WHOLE_FLOW = """
import sys
from pathlib import Path
from anomaly3d_core.config import build_config
from anomaly3d_core.config import build_config
from anomaly3d_core.engine import Engine
from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.persistence import build_detector, load_detector

demo, work = Path(sys.argv[1]), Path(sys.argv[2])
config = build_config({**FAST, "tracking": {"enabled": True}})  # a tracker is injected, never read from here
engine = Engine()
fitted = engine.fit(build_detector(config), list_inputs(demo / "train"), out=work / "model", show_progress=False)
model = load_detector(fitted.folder)
batch = engine.score(model, list_inputs(demo / "test"), work / "scores")
result = engine.evaluate(model, list_inputs(demo / "test"), demo / "test_masks", work / "evaluation")
assert len(batch.rows) == 4 and not batch.failures and result.metrics["n_volumes"] == 4
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "optuna") or ".mlops" in m)
print("imported:", heavy)
"""


def test_whole_flow_through_the_engine_needs_no_tracking_store(demo_dir, tmp_path):
    """fit → save → load → score → evaluate with the null tracker: nothing of MLflow is imported,
    no tracking store is made, and the model folder is a plain one."""
    code = f"FAST = {FAST!r}\n" + textwrap.dedent(WHOLE_FLOW)
    done = subprocess.run(
        [sys.executable, "-c", code, str(demo_dir), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: []" in done.stdout
    model = tmp_path / "model"
    assert (model / "config.yaml").is_file() and (model / "plugins.json").is_file()
    assert not (model / "MLmodel").exists() and (model / "training_curves.png").is_file()
    assert (tmp_path / "scores" / "scores.csv").is_file() and (
        tmp_path / "evaluation" / "metrics.json"
    ).is_file()
    assert not list(tmp_path.glob("mlruns*")) and not (tmp_path / "mlartifacts").exists()


class Recorder(NullTracker):
    """A tracker that writes down what the engine tells it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @contextlib.contextmanager
    def run(self, command, config, label, dataset=None, tags=None):
        self.calls.append(("run", command, label, dataset))
        yield "the-run"
        self.calls.append(("end", command))

    def log_metrics(self, metrics, step=None, model_id=None, dataset=None):
        self.calls.append(("metrics", tuple(sorted(metrics)), model_id, dataset))

    def log_artifact(self, path, folder=None):
        self.calls.append(("artifact", Path(path).name, folder))

    def log_fit_datasets(self, detector, train, val, name, val_name=None):
        self.calls.append(("fit datasets", len(train), name))

    def log_evaluation_dataset(self, items, failed, masks, name, source):
        self.calls.append(("evaluation dataset", len(items), name))
        return "the-dataset"

    def log_model(self, detector, register=None):
        self.calls.append(("model", register))
        return {"run_id": "r1", "model_id": "m-1"}

    def link_model(self, source, lineage):
        self.calls.append(("link", source, lineage.get("run_id")))
        return lineage.get("model_id")


def test_flows_inside_one_run_record_into_it(demo_dir, tmp_path):
    rec = Recorder()
    assert isinstance(rec, Tracker) and isinstance(NullTracker(), Tracker)
    engine = Engine(rec)
    tests = list_inputs(demo_dir / "test")
    with engine.run("demo", None, "fast.yaml", "train-set") as run:
        assert run == "the-run"
        fitted = engine.fit(
            AnomalyDetectionPipeline(FAST),
            list_inputs(demo_dir / "train"),
            out=tmp_path / "model",
            train_name="train-set",
            register=("demo", "champion"),
            show_progress=False,
        )
        engine.score(fitted.detector, tests, tmp_path / "scores", log_maps=1)
        result = engine.evaluate(
            fitted.detector, tests, demo_dir / "test_masks", tmp_path / "evaluation", data_name="tests"
        )
    kinds = [c[0] for c in rec.calls]
    assert kinds.count("run") == 1 and kinds[0] == "run" and kinds[-1] == "end"  # one run, never a second
    assert ("fit datasets", 4, "train-set") in rec.calls and ("model", ("demo", "champion")) in rec.calls
    assert ("artifact", "training_curves.png", "plots") in rec.calls
    assert sum(c[0] == "artifact" and c[2] == "score_maps" for c in rec.calls) == 1
    assert ("evaluation dataset", 4, "tests") in rec.calls
    evaluation = [c for c in rec.calls if c[0] == "metrics" and c[3] == "the-dataset"]
    assert evaluation and set(evaluation[0][1]) == set(result.metrics)  # no saved model: its own metrics only
    # the plain folder names the run that recorded its model, as an MLflow folder's MLmodel does
    assert read_lineage(fitted.folder) == {"run_id": "r1", "model_id": "m-1", "model_uri": "models:/m-1"}
    assert json.loads((fitted.folder / "metadata.json").read_text())["anomaly3d"]["run_id"] == "r1"


def test_evaluating_a_saved_model_links_it_and_records_its_thresholds(
    fitted, saved_model, demo_dir, tmp_path
):
    rec = Recorder()
    engine = Engine(rec)
    lineage = engine.model_lineage(saved_model, fitted.config)
    engine.evaluate(
        fitted,
        list_inputs(demo_dir / "test"),
        demo_dir / "test_masks",
        tmp_path,
        label="model",
        model=str(saved_model),
        lineage={**lineage, "run_id": "r9", "model_id": "m-9"},
    )
    assert (
        rec.calls[0] == ("run", "evaluate", "model", None) and ("link", str(saved_model), "r9") in rec.calls
    )
    metrics = next(c for c in rec.calls if c[0] == "metrics")
    assert "pixel_ap" in metrics[1] and "volume_threshold" in metrics[1] and metrics[2] == "m-9"


def test_plain_and_mlflow_model_folders_load_alike(fitted, saved_model, demo_dir, tmp_path):
    """``Detector.save`` writes a plain folder; the MLflow folder that ``fit --out`` writes still loads."""
    plain = fitted.save(tmp_path / "plain")
    assert not (plain / "MLmodel").exists() and (saved_model / "MLmodel").is_file()
    scan = list_inputs(demo_dir / "test")[-1]
    expected = fitted.score(scan)
    for folder in (plain, saved_model):
        got = load_detector(folder).score(scan)
        assert np.array_equal(got.score_map, expected.score_map) and got.volume_score == expected.volume_score
    assert fitted.save(plain) == plain  # a model folder is replaced whole


def test_build_detector_is_what_fit_trains(demo_dir):
    from anomaly3d_core.config import build_config

    result = Engine().fit(
        build_detector(build_config(FAST)), list_inputs(demo_dir / "train"), show_progress=False
    )
    assert result.folder is None and result.lineage == {} and not result.failures
    assert result.detector.threshold_ > 0


def test_overlapped_scoring_gives_the_one_by_one_results(fitted, demo_dir, tmp_path):
    """Reading ahead and writing behind changes neither the figures, nor their order, nor the failures."""
    import nibabel as nib

    from anomaly3d_core.runner import score_files

    scans = list_inputs(demo_dir / "test")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a scan")
    inputs = [scans[0], bad, *scans[1:]]
    ahead = score_files(fitted, inputs, tmp_path / "a", keep_results=True)
    one_by_one = score_files(fitted, inputs, tmp_path / "b", keep_results=True, overlap=False)
    assert ahead.rows == one_by_one.rows and [r["file"] for r in ahead.rows] == [str(s) for s in scans]
    assert ahead.failures.items == one_by_one.failures.items and ahead.failures.items[0][0] == str(bad)
    for x, y in zip(ahead.results, one_by_one.results, strict=True):
        assert np.array_equal(x.score_map, y.score_map) and x.volume_score == y.volume_score
    for row in ahead.rows:
        a, b = (nib.load(tmp_path / d / row["score_map"]) for d in ("a", "b"))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()


def test_a_model_folder_keeps_the_detectors_settings_only(fitted, tmp_path):
    """Tracking and tuning settings belong to the run, not to the saved detector."""
    import yaml

    from anomaly3d_core.config import TrackingConfig

    tree = yaml.safe_load((fitted.save(tmp_path / "m") / "config.yaml").read_text())
    assert "tracking" not in tree and "tuning" not in tree and "training" in tree
    assert load_detector(tmp_path / "m").config.tracking == TrackingConfig()  # defaults: the run sets them
    assert not fitted.is_ensemble and fitted.reference() is fitted and not fitted.config.is_ensemble


class Stop(Exception):
    """The fake search's own 'prune this trial'."""


class FakeStudy:
    """A search without Optuna: fixed overrides per trial; trial 1 is stopped at its first report."""

    def __init__(self, settings: list[list[str]]) -> None:
        self.settings, self.reports, self.values = settings, [], {}

    def optimize(self, objective, n_trials, timeout):
        for number in range(n_trials):
            try:
                self.values[number] = objective(number)
            except Stop:
                self.values[number] = "pruned"

    def suggest(self, trial):
        return trial, self.settings[trial]

    def report(self, trial, value, step):
        self.reports.append((trial, step))
        if trial == 1:
            raise Stop


class TrialRecorder(Recorder):
    @contextlib.contextmanager
    def trial(self, number, config, tags, datasets=()):
        self.calls.append(("trial", number, config.training.num_epochs, dict(tags), tuple(datasets)))
        yield "trial-run"
        self.calls.append(("end trial", number))


def test_the_tune_flow_runs_trials_from_a_factory_and_stops_what_the_study_stops(demo_dir, tmp_path):
    """Engine.tune needs no Optuna: each trial builds its detector from the suggested overrides, fits
    into its own folder inside its own trial run, reports to the study (which may stop it) and is
    scored by the validation callable."""
    rec, train = TrialRecorder(), list_inputs(demo_dir / "train")
    study = FakeStudy([["training.num_epochs=2"], ["training.num_epochs=4"], ["training.num_epochs=3"]])

    def build(overrides):
        return build_detector(build_config(FAST, overrides))

    def validate(detector):
        return {"pixel_ap": float(detector.config.training.num_epochs)}

    values = Engine(rec).tune(
        study,
        build,
        train,
        validate,
        tmp_path / "trials",
        metric="pixel_ap",
        n_trials=3,
        report_every=2,
        tags=lambda cfg: {"tag": "x"},
        datasets=["train-set"],
    )
    assert values == {0: 2.0, 2: 3.0} and study.values[1] == "pruned"
    assert study.reports == [(0, 1), (1, 1), (2, 1)]  # every report_every epochs
    trials = [c for c in rec.calls if c[0] == "trial"]
    assert trials == [
        ("trial", n, e, {"tag": "x", "optuna.trial": str(n)}, ("train-set",))
        for n, e in ((0, 2), (1, 4), (2, 3))
    ]
    assert ("metrics", ("fit_seconds", "pixel_ap", "threshold", "volume_threshold"), None, None) in rec.calls
    assert not any(c[0] == "run" for c in rec.calls)  # a trial's fit records into the trial run only
    assert (tmp_path / "trials" / "0000" / "config.yaml").is_file() and (
        tmp_path / "trials" / "0002"
    ).is_dir()
    assert not (tmp_path / "trials" / "0001" / "config.yaml").exists()  # stopped before it was written
