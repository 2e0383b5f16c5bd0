"""Fault injection and hostile input (issue 12): no code execution, no lost or wrong results,
bounded resources, clear errors and exit codes. Each test reproduces one reported case."""

from __future__ import annotations

import base64
import csv
import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import types
import zlib
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from conftest import FAST, blob_volume, oblique_affine
from writers import write_dicom_series, write_nifti

from anomaly3d_core.cli import main
from anomaly3d_core.config import TrainingConfig
from anomaly3d_core.errors import Anomaly3DError, ConfigError, DataError
from anomaly3d_core.evaluator import find_mask
from anomaly3d_core.io import cache, limits
from anomaly3d_core.io.files import (
    list_inputs,
    load_volume,
    output_stems,
    replace_tree,
    save_nifti,
    scan_stem,
)
from anomaly3d_core.io.nifti import read_nifti
from anomaly3d_core.mlops.serving import save_pyfunc
from anomaly3d_core.persistence import load_detector
from anomaly3d_core.pipeline import AnomalyDetectionPipeline
from anomaly3d_core.runner import score_files, write_csv

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- hostile files
def header_only_nifti(shape, dtype=np.float32, data: bytes = b"") -> bytes:
    """A NIfTI-1 header claiming ``shape`` (and whatever data follows): the 'header bomb'."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0\0\0\0" + data


def gzip_bomb(megabytes: int, shape=(24, 24, 24), with_data: bool = True) -> bytes:
    """A ``.nii.gz`` header claiming ``shape`` (uint8), its voxels (``with_data``), then ``megabytes``
    MiB of zeros, compressed about 1000:1."""
    n = int(np.prod(shape))
    body = header_only_nifti(shape, np.uint8)
    if with_data:
        body += np.random.default_rng(0).integers(1, 200, n, np.uint8).tobytes()
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts, zeros = [comp.compress(body)], bytes(1 << 20)
    parts += [comp.compress(zeros) for _ in range(megabytes)]
    parts.append(comp.flush())
    return b"".join(parts)


class Marker:
    """Code that, if ever executed, leaves a file behind."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "PWNED"

    def python(self) -> str:
        return f"open({str(self.path)!r}, 'w').write('ran')\n"

    def ran(self) -> bool:
        return self.path.exists()


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tiny_autoencoder(dim: int = 10):
    from anomaly3d_plugins.autoencoders.standard import StandardAutoencoder

    return StandardAutoencoder(dim, hidden_dims=[8], latent_dim=2)


# ================================================================ code execution
def test_resume_refuses_a_crafted_checkpoint(tmp_path):
    from anomaly3d_core.model.training import train_autoencoder

    marker = Marker(tmp_path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": _Payload(str(marker.path)), "epoch": 0}, ckpt / "last.pt")
    settings = TrainingConfig(num_epochs=2, checkpoint_dir=str(ckpt), resume=True, batch_size=32)
    data = torch.randn(64, 10)
    with pytest.raises(ConfigError, match="training.resume: cannot read checkpoint") as err:
        train_autoencoder(tiny_autoencoder(), data, data, settings, show_progress=False)
    assert not marker.ran() and "\n" not in str(err.value)
    # a real checkpoint from another network is refused with one line too
    train_autoencoder(
        tiny_autoencoder(), data, data, settings.model_copy(update={"resume": False}), show_progress=False
    )
    with pytest.raises(ConfigError, match="saved from a different network"):
        train_autoencoder(tiny_autoencoder(dim=12), torch.randn(64, 12), None, settings, show_progress=False)


def test_loading_a_model_never_runs_code_from_its_folder(saved_model, demo_dir, tmp_path, capsys):
    marker = Marker(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    for code in [model / "python_model.py", *model.rglob("*.py")]:
        code.write_text(marker.python())  # MLflow's "model from code" entry, and anything else
    (model / "artifacts" / "pipeline" / "__init__.py").write_text(marker.python())
    (model / "artifacts" / "pipeline" / "sitecustomize.py").write_text(marker.python())
    load_detector(model)
    AnomalyDetectionPipeline.load(model)
    assert (
        main(
            ["score", "--model", str(model), "--input", str(demo_dir / "test"), "--out", str(tmp_path / "o")]
        )
        == 0
    )
    assert not marker.ran()
    # the model's own files cannot carry code either: a YAML python tag and a pickled weights file are refused
    inner = model / "artifacts" / "pipeline"
    config = inner / "config.yaml"
    saved_config = config.read_text()
    config.write_text(f"!!python/object/apply:os.system ['touch {marker.path}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_detector(model)
    config.write_text(saved_config)
    torch.save({"w": _Payload(str(marker.path))}, inner / "weights.pt")
    with pytest.raises(Anomaly3DError, match="weights.pt: not usable weights"):
        load_detector(model)
    assert not marker.ran()
    # MLflow itself does run the folder's code (hence README: serve only model folders you trust)
    with pytest.raises(Exception):  # noqa: B017 - whatever MLflow raises after running the entry code
        mlflow.pyfunc.load_model(str(model))
    assert marker.ran()


# ================================================================ lost or wrong results
def _weights(model: Path) -> dict[str, torch.Tensor]:
    return torch.load(model / "artifacts" / "pipeline" / "weights.pt", weights_only=True)


def test_a_failed_save_keeps_the_previous_model(fitted, saved_model, tmp_path, monkeypatch):
    target = tmp_path / "model"
    shutil.copytree(saved_model, target)
    before = _weights(target)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlflow.pyfunc, "save_model", broken)
    with pytest.raises(OSError, match="No space left"):
        save_pyfunc(fitted, target)
    after = load_detector(target)
    assert all(torch.equal(v, after.model_.state_dict()[k].cpu()) for k, v in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


KILL_DURING_SAVE = """
import sys, time
from pathlib import Path
from anomaly3d_core.persistence import load_detector
from anomaly3d_core.pipeline import AnomalyDetectionPipeline

pipe = load_detector(sys.argv[1])
real = AnomalyDetectionPipeline.save_files

def slow(self, path):
    out = real(self, path)
    (Path(path) / "weights.pt").write_bytes(b"half a file")
    Path(sys.argv[3]).write_text("saving")
    time.sleep(60)
    return out

AnomalyDetectionPipeline.save_files = slow
pipe.save(sys.argv[2])
"""


def test_fit_killed_while_saving_leaves_the_previous_model_loadable(saved_model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(saved_model, target)
    before = _weights(target)
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, str(saved_model), str(target), str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not ready.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    after = load_detector(target)  # the old model, whole
    assert all(torch.equal(v, after.model_.state_dict()[k].cpu()) for k, v in before.items())
    assert any(p.name.startswith(".model.tmp-") for p in tmp_path.iterdir())  # the killed writer's leftovers
    replace_tree(target, lambda new: shutil.copytree(saved_model, new))  # the next writer clears them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "ready"]


HOLD_LOCK = """
import sys, time
from anomaly3d_core.io.files import write_lock
with write_lock(sys.argv[1], "model folder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_gets_a_clear_error(fitted, demo_dir, tmp_path, capsys):
    target = tmp_path / "model"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Anomaly3DError, match="another process is writing this model folder"):
            save_pyfunc(fitted, target)
        args = [
            "fit",
            "--train",
            str(demo_dir / "train"),
            "--out",
            str(target),
            "--set",
            "tracking.enabled=false",
        ]
        t0 = time.perf_counter()
        assert main(args) == 2
        assert time.perf_counter() - t0 < 10  # refused before training, not after
        assert "another process is writing this model folder" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    save_pyfunc(fitted, target)  # the lock dies with its holder
    assert (target / "MLmodel").is_file() and not list(tmp_path.glob(".*"))


def test_same_names_in_different_folders_get_their_own_outputs(fitted, demo_dir, tmp_path):
    scan = sorted((demo_dir / "test").iterdir())[-1]
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        shutil.copy(scan, tmp_path / "in" / folder / "sub.nii.gz")
    single = tmp_path / "in" / "c"
    single.mkdir()
    shutil.copy(scan, single / "other.nii.gz")
    inputs = sorted((tmp_path / "in").glob("*/*.nii.gz"))
    assert output_stems(inputs) == ["a/sub", "b/sub", "other"]
    batch = score_files(fitted, inputs, tmp_path / "out")
    assert not batch.failures
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert sorted(r["score_map"] for r in rows) == [
        "a/sub_score.nii.gz",
        "b/sub_score.nii.gz",
        "other_score.nii.gz",
    ]
    for row in rows:
        assert (tmp_path / "out" / row["score_map"]).is_file() and (tmp_path / "out" / row["mask"]).is_file()
    # DICOM folders with one name; and a clash no folder can resolve refuses the batch up front
    dicom = [tmp_path / "d" / p / "series" for p in ("p1", "p2")]
    assert output_stems(dicom) == ["p1/series", "p2/series"]
    shutil.copy(scan, tmp_path / "in" / "a" / "sub.nii")
    with pytest.raises(Anomaly3DError, match=r"sub.nii.gz and .*sub.nii would write the same outputs"):
        score_files(
            fitted, [tmp_path / "in" / "a" / "sub.nii.gz", tmp_path / "in" / "a" / "sub.nii"], tmp_path / "o2"
        )
    assert not (tmp_path / "o2").exists()


MGZ_PLUGIN = """
from anomaly3d_core import hookimpl
from anomaly3d_core.interfaces import VolumeLoader
from anomaly3d_core.io.nifti import read_nifti
from anomaly3d_core.io.volume import Volume

class MgzLoader(VolumeLoader):
    name = "mgz"
    extensions = (".mgz",)

    def load(self, path):
        data, affine = read_nifti(path)
        return Volume(data, affine, str(path))

@hookimpl
def anomaly3d_register_loaders():
    return [MgzLoader]
"""


def test_a_third_party_extension_stays_out_of_the_stem(fitted, demo_dir, tmp_path, monkeypatch):
    from anomaly3d_core.registry import Registry, get_plugin_manager

    module = types.ModuleType("mgz_plugin")
    exec(textwrap.dedent(MGZ_PLUGIN), module.__dict__)
    pm = get_plugin_manager()
    pm.register(module, name="mgz-plugin")
    reg = Registry(pm)
    assert scan_stem("x/sub.01.mgz", reg) == "sub.01" and scan_stem("x/sub.01.mgz") == "sub.01.mgz"
    shutil.copy(sorted((demo_dir / "test").iterdir())[-1], tmp_path / "sub.mgz")
    monkeypatch.setattr(fitted, "registry", reg)
    score_files(fitted, [tmp_path / "sub.mgz"], tmp_path / "out")
    assert (tmp_path / "out" / "sub_score.nii.gz").is_file()
    assert not list((tmp_path / "out").glob("sub.mgz*"))


def test_evaluate_matches_masks_exactly(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in (
        "sub.01_mask.nii.gz",
        "sub.02_mask.nii.gz",
        "sub[1]_seg.nii.gz",
        "s1.nii.gz",
        "s1_mask.nii.gz",
    ):
        (masks / name).write_bytes(b"")
    assert find_mask(tmp_path / "sub.01.nii.gz", masks).name == "sub.01_mask.nii.gz"
    assert find_mask(tmp_path / "sub.02.nii.gz", masks).name == "sub.02_mask.nii.gz"
    assert find_mask(tmp_path / "sub[1].nii.gz", masks).name == "sub[1]_seg.nii.gz"  # no glob
    with pytest.raises(DataError, match="no ground-truth mask"):
        find_mask(tmp_path / "sub.nii.gz", masks)  # 'sub' is not 'sub.01'
    with pytest.raises(DataError, match=r"ambiguous ground truth .*s1.nii.gz, s1_mask.nii.gz all match"):
        find_mask(tmp_path / "s1.nii.gz", masks)


class _Interrupted:
    """A detector that is stopped (Ctrl-C, or any error) while scoring its second input."""

    def __init__(self, fitted, error: BaseException) -> None:
        self.fitted, self.error, self.calls, self.registry = fitted, error, 0, None

    def read(self, path):
        return self.fitted.read(path)

    def prepare(self, volume):  # scored whole below
        return volume

    def score(self, volume):
        self.calls += 1
        if self.calls == 2:
            raise self.error
        return self.fitted.score(volume)


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(out / "scores.csv")))


def test_scores_csv_always_describes_the_maps_on_disk(fitted, demo_dir, tmp_path):
    scans = sorted((demo_dir / "test").iterdir())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        score_files(_Interrupted(fitted, KeyboardInterrupt()), scans[:3], out)
    rows = _rows(out)
    assert [Path(r["file"]).name for r in rows] == [scans[0].name]  # the maps written so far, and only those
    report = rows[0]["score_map"].replace("_score.nii.gz", "_report.html")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            rows[0]["score_map"],
            rows[0]["mask"],
            rows[0]["p_map"],
            rows[0]["lesion_table"],
            report,
            "scores.csv",
        ]
    )
    # a second run into the same folder adds its rows instead of replacing the first run's
    score_files(fitted, scans[2:], out)
    assert {Path(r["file"]).name for r in _rows(out)} == {scans[0].name, *(s.name for s in scans[2:])}
    # rows whose maps were removed are dropped by the next run
    (out / rows[0]["score_map"]).unlink()
    score_files(fitted, scans[3:], out)
    assert scans[0].name not in {Path(r["file"]).name for r in _rows(out)}
    # a temporary file left by a killed writer is never taken for an input
    (out / ".sub-100_score.nii.gz.tmp-x1y2.nii.gz").write_bytes(b"partial")
    assert all(not p.name.startswith(".") for p in list_inputs(out))


def test_written_files_follow_the_umask(fitted, tmp_path):
    old = os.umask(0o027)
    try:
        save_nifti(np.ones((4, 4, 4)), np.eye(4), tmp_path / "a.nii.gz")
        write_csv([], tmp_path / "scores.csv")
        fitted.save(tmp_path / "model")  # a plain folder
        save_pyfunc(fitted, tmp_path / "mlflow_model")  # an MLflow one
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.nii.gz") == 0o640 and mode(tmp_path / "scores.csv") == 0o640
    for model, inner in ((tmp_path / "model", "."), (tmp_path / "mlflow_model", "artifacts/pipeline")):
        assert mode(model) == 0o750 and mode(model / inner / "example.nii.gz") == 0o640
        assert all(mode(p) & 0o040 for p in model.rglob("*") if p.is_file())  # the group can read everything


def test_tuning_writes_the_best_once_and_keys_trials_by_study(saved_model, tmp_path):
    from anomaly3d_core.config import build_config
    from anomaly3d_core.mlops.tuning import finishes_last, trials_dir, write_best

    out = tmp_path / "out"
    assert trials_dir(out, "brain") != trials_dir(out, "spine")
    assert trials_dir(out, "../x y").parent == out / "trials"
    study = optuna.create_study(study_name="brain", direction="maximize")
    dist = {"training.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    for value, lr in ((0.2, 1e-3), (0.7, 2e-3)):
        study.add_trial(
            optuna.trial.create_trial(params={"training.learning_rate": lr}, distributions=dist, value=value)
        )
    running = study.ask()  # a worker elsewhere is still busy: nobody writes the best yet
    assert not finishes_last(study)
    study.tell(running, 0.1)
    assert finishes_last(study)
    shutil.copytree(saved_model, trials_dir(out, "brain") / "0001")
    config = build_config({"tracking": {"enabled": False}})
    best = write_best(study, config.model_dump(mode="json"), config, "brain", out, "voxel_ap")
    assert (
        best.number == 1
        and yaml.safe_load((out / "best_config.yaml").read_text())["training"]["learning_rate"] == 2e-3
    )
    assert json.loads((out / "best.json").read_text())["trial"] == 1
    stamp = (out / "best_model").stat().st_mtime_ns
    write_best(study, config.model_dump(mode="json"), config, "brain", out, "voxel_ap")
    assert (out / "best_model").stat().st_mtime_ns == stamp  # written once
    assert not list(out.glob(".*"))


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from anomaly3d_core.model import training

    data = torch.randn(64, 10)
    settings = TrainingConfig(num_epochs=2, checkpoint_dir=str(tmp_path), batch_size=32)
    training.train_autoencoder(tiny_autoencoder(), data, data, settings, show_progress=False)
    good = (tmp_path / "last.pt").read_bytes()
    real = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(training.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        training.train_autoencoder(tiny_autoencoder(), data, data, settings, show_progress=False)
    monkeypatch.setattr(training.torch, "save", real)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "history.json", "last.pt"]


# ================================================================ bounded resources
def test_a_header_bomb_is_refused_before_reading(tmp_path):
    bomb = tmp_path / "bomb.nii"
    bomb.write_bytes(header_only_nifti((1200, 1200, 1200)))
    t0 = time.perf_counter()
    with pytest.raises(
        DataError, match=r"header claims 1200 x 1200 x 1200 = 1,728,000,000 voxels, above the limit"
    ):
        load_volume(bomb)
    gz = tmp_path / "bomb.nii.gz"
    gz.write_bytes(gzip.compress(header_only_nifti((1200, 1200, 1200))))
    with pytest.raises(DataError, match="ANOMALY3D_MAX_VOXELS"):
        load_volume(gz)
    assert time.perf_counter() - t0 < 1
    # every format checks its header first: NumPy, ITK, DICOM
    npy = tmp_path / "bomb.npy"
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (1200, 1200, 1200)}
        )
    with pytest.raises(DataError, match="header claims 1200 x 1200 x 1200"):
        load_volume(npy)
    nrrd = tmp_path / "bomb.nrrd"
    nrrd.write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 1200 1200 1200\nendian: little\nencoding: raw\n\n"
    )
    with pytest.raises(DataError, match="header claims 1200 x 1200 x 1200"):
        load_volume(nrrd)
    with limits.override(max_voxels=1000):
        folder = write_dicom_series(np.round(blob_volume((12, 12, 12))), np.eye(4), tmp_path, "dcm")
        with pytest.raises(DataError, match=r"header claims 12 x 12 x 12 = 1,728 voxels"):
            load_volume(folder)


def test_decompression_stops_at_the_declared_size(tmp_path, monkeypatch):
    bomb = gzip_bomb(256)  # 256 MiB of zeros after a valid 24^3 volume
    assert len(bomb) < 400_000
    t0 = time.perf_counter()
    data, _ = read_nifti(bomb)
    assert data.shape == (24, 24, 24) and time.perf_counter() - t0 < 1  # the zeros are never inflated
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(bomb)
    assert load_volume(path).shape == (24, 24, 24)
    # a header within the voxel limit but beyond the byte limit is refused before inflating
    monkeypatch.setenv("ANOMALY3D_MAX_BYTES", "1M")
    big = gzip.compress(header_only_nifti((200, 200, 200), np.float32, bytes(200**3 * 4)), 1)
    with pytest.raises(
        DataError, match=r"header claims 32,000,352 bytes of data, above the limit of 1,048,576"
    ):
        read_nifti(big)
    monkeypatch.setenv("ANOMALY3D_MAX_BYTES", "lots")
    with pytest.raises(ConfigError, match="ANOMALY3D_MAX_BYTES: 'lots' is not a positive number"):
        read_nifti(big)


def test_absurd_voxel_sizes_are_refused_and_never_stop_a_batch(saved_model, demo_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    shutil.copytree(demo_dir / "test", inputs)
    save_nifti(blob_volume((16, 16, 16)), np.diag([4000.0, 4000.0, 4000.0, 1.0]), inputs / "sub-000.nii.gz")
    out = tmp_path / "out"
    assert main(["score", "--model", str(saved_model), "--input", str(inputs), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (
        "sub-000.nii.gz: resampling from voxels of 4000 x 4000 x 4000 mm would make a 16000 x 16000 x 16000 grid"
        in err
    )
    assert "ANOMALY3D_MAX_GRID_VOXELS" in err and "Traceback" not in err
    assert len(_rows(out)) == 4  # the others were scored
    small = save_nifti(
        blob_volume((16, 16, 16)), np.diag([64.0, 64.0, 64.0, 1.0]), tmp_path / "coarse.nii.gz"
    )
    assert small.stat().st_size < 5000
    default = AnomalyDetectionPipeline({**FAST, "data": {"preprocessing": {"target_spacing": 2.0}}})
    with pytest.raises(DataError, match="a 512 x 512 x 512 grid = 134,217,728 voxels"):
        default.prepare(small)  # a few KB at 64 mm would be 512^3 voxels at 2 mm


def test_any_exception_for_one_file_never_stops_the_batch(fitted, demo_dir, tmp_path):
    scans = sorted((demo_dir / "test").iterdir())
    error = RuntimeError("[enforce fail at alloc_cpu.cpp:117] tried to allocate 131 TB")
    batch = score_files(_Interrupted(fitted, error), scans, tmp_path / "out")
    assert len(batch.rows) == len(scans) - 1 and len(_rows(tmp_path / "out")) == len(scans) - 1
    ((path, reason),) = batch.failures.items
    assert path == str(scans[1]) and reason.startswith("unexpected RuntimeError: [enforce fail")
    assert "--debug" in reason


@pytest.fixture(scope="module")
def served(saved_model):
    return mlflow.pyfunc.load_model(str(saved_model))


def _predict_error(model, text):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame({"volume": [text]}))
    return err.value


def test_every_server_failure_is_one_line_without_a_path(served, monkeypatch):
    cases = {
        "not base64": ("definitely not base64!", 400, "not valid base64"),
        "not NIfTI": (_b64(b"hello, world"), 400, "not a NIfTI file"),
        "header bomb": (_b64(header_only_nifti((1200, 1200, 1200))), 400, "above the limit"),
        "truncated": (
            _b64(gzip.compress(header_only_nifti((30, 30, 30), np.float32, b"\1" * 999))),
            400,
            "truncated",
        ),
        "2D": (_b64(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)).to_bytes()), 400, "2D data"),
    }
    for name, (text, status, words) in cases.items():
        exc = _predict_error(served, text)
        assert exc.get_http_status_code() == status and words in exc.message, name
        assert "\n" not in exc.message and "/" not in exc.message, (name, exc.message)
    inner = served.unwrap_python_model()

    def crash(volume):
        raise RuntimeError(f"cannot open {ROOT}/secret/weights.bin\nTraceback (most recent call last): ...")

    monkeypatch.setattr(inner.pipeline, "score", crash)
    exc = _predict_error(served, _b64(gzip_bomb(1)))
    assert exc.get_http_status_code() == 500
    assert exc.message == "row 0: internal error while scoring (RuntimeError); see the server log"
    # MLflow's server decorates a model's error with the request data; ours keep their one line
    exc.message = "Failed to predict data '...'. \nError: " + exc.message
    assert exc.message.startswith("row 0: internal error")


# ================================================================ clear errors and exit codes
def test_an_unusable_out_is_refused_first(saved_model, demo_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        t0 = time.perf_counter()
        args = ["score", "--model", str(saved_model), "--input", str(demo_dir / "test"), "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"anomaly3d score: error: --out {out}") and len(err.strip().splitlines()) == 1
        assert time.perf_counter() - t0 < 2  # before loading the model or scoring anything
    assert main(["fit", "--train", str(demo_dir / "train"), "--out", str(blocker)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fit", "demo", "tune"])
def test_every_command_reads_configs_the_same_safe_way(command, demo_dir, tmp_path, capsys):
    marker = Marker(tmp_path)
    bad = {
        "broken.yaml": ("training: {num_epochs: 3\n", "not valid YAML"),
        "evil.yaml": (f"!!python/object/apply:os.system ['touch {marker.path}']\n", "not valid YAML"),
    }
    for name, (text, words) in bad.items():
        (tmp_path / name).write_text(text)
        args = {
            "fit": ["fit", "--train", str(demo_dir / "train"), "--out", str(tmp_path / "m")],
            "demo": ["demo", "--out", str(tmp_path / "d")],
            "tune": ["tune", "--train", str(demo_dir / "train"), "--out", str(tmp_path / "t")],
        }[command]
        assert main([*args, "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"config error: {tmp_path / name}: {words}" in err and len(err.strip().splitlines()) == 1
    assert not marker.ran()


def test_unexpected_errors_have_their_own_exit_code(monkeypatch, capsys, tmp_path):
    from anomaly3d_core import cli

    def disk_full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(cli.COMMANDS, "plugins", disk_full)
    assert main(["plugins"]) == 3
    err = capsys.readouterr().err
    assert err.strip() == (
        "anomaly3d plugins: unexpected error: OSError: [Errno 28] No space left on device "
        "(rerun with --debug for the traceback)"
    )
    with pytest.raises(OSError):
        main(["plugins", "--debug"])


def test_a_model_whose_plugin_is_gone_says_what_to_install(saved_model, demo_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    inner = model / "artifacts" / "pipeline"
    config = yaml.safe_load((inner / "config.yaml").read_text())
    config["autoencoder"]["type"] = "fancy"
    (inner / "config.yaml").write_text(yaml.safe_dump(config))
    plugins = json.loads((inner / "plugins.json").read_text())
    plugins.append({"family": "autoencoders", "name": "fancy", "package": "fancy-ae", "version": "1.2"})
    (inner / "plugins.json").write_text(json.dumps(plugins))
    assert (
        main(
            ["score", "--model", str(model), "--input", str(demo_dir / "test"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "needs the autoencoder plugin 'fancy' from package 'fancy-ae' 1.2, which is not installed here" in err
    )
    assert "pip install 'fancy-ae==1.2'" in err and len(err.strip().splitlines()) == 1


def test_choosing_a_dicom_series_at_score_time(saved_model, tmp_path, capsys):
    array = np.round(blob_volume((30, 34, 22)))
    write_dicom_series(array, oblique_affine(), tmp_path / "in", "mixed", series_uid="1.2.3.4")
    write_dicom_series(array + 5, oblique_affine(), tmp_path / "in", "mixed", series_uid="1.2.3.5")
    base = [
        "score",
        "--model",
        str(saved_model),
        "--input",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(base) == 1
    assert "--set data.loader=dicom --set data.loader_args.series_uid=UID" in capsys.readouterr().err
    chosen = ["--set", "data.loader=dicom", "--set", "data.loader_args.series_uid=1.2.3.5"]
    assert main([*base, *chosen]) == 0
    assert [r["score_map"] for r in _rows(tmp_path / "o")] == ["mixed_score.nii.gz"]
    assert main([*base, "--set", "training.num_epochs=3"]) == 2
    assert "only data.loader and data.loader_args" in capsys.readouterr().err


def test_links_and_itk_errors_name_the_cause(tmp_path):
    (tmp_path / "loop.nii.gz").symlink_to("loop.nii.gz")
    (tmp_path / "dangling.nii.gz").symlink_to("gone.nii.gz")
    with pytest.raises(DataError, match="symbolic link loop"):
        load_volume(tmp_path / "loop.nii.gz")
    with pytest.raises(DataError, match="broken symbolic link .*gone.nii.gz"):
        load_volume(tmp_path / "dangling.nii.gz")
    import SimpleITK as sitk

    sitk.WriteImage(
        sitk.GetImageFromArray(np.random.rand(6, 6, 6).astype(np.float32)), str(tmp_path / "x.mhd")
    )
    (tmp_path / "x.raw").unlink()
    with pytest.raises(DataError, match="header names the data file 'x.raw', which is not in"):
        load_volume(tmp_path / "x.mhd")
    (tmp_path / "junk.mha").write_bytes(b"junk")
    with pytest.raises(DataError, match="matches no ITK format reader"):
        load_volume(tmp_path / "junk.mha")


def test_cache_keys_paths_and_size_bound(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY3D_CACHE_DIR", str(tmp_path / "c"))
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a").write_bytes(b"bc")
    (two / "ab").write_bytes(b"c")  # the same bytes once name and content are run together
    assert cache.content_key(one, {}) != cache.content_key(two, {})
    first = write_nifti(blob_volume(), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path, "first")
    copy = tmp_path / "copy.nii.gz"
    shutil.copy(first, copy)
    pipe = AnomalyDetectionPipeline(FAST)
    assert pipe._prepare_cached(first).source.path == str(first)
    assert pipe._prepare_cached(copy).source.path == str(copy)  # a hit, reported under the asking path
    entry = next((tmp_path / "c").glob("*.npz"))
    monkeypatch.setenv("ANOMALY3D_CACHE_MAX_MB", str(2.5 * entry.stat().st_size / (1 << 20)))
    for seed in range(3):
        time.sleep(0.01)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        pipe._prepare_cached(write_nifti(blob_volume(seed=seed + 1), affine, tmp_path, f"s{seed}"))
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2  # the least recently used went


# ================================================================ the real server
@pytest.mark.slow
def test_server_rejects_bombs_fast_and_keeps_serving(saved_model, demo_dir, tmp_path):

    from servers import mlflow_server, post

    # the server obeys the same limits as the CLI, from its environment
    with mlflow_server(saved_model, tmp_path, {"ANOMALY3D_MAX_BYTES": "4M"}) as port:
        scan = _b64(sorted((demo_dir / "test").iterdir())[-1].read_bytes())
        payloads = {
            "header bomb (1200^3 claimed)": (
                _b64(header_only_nifti((1200, 1200, 1200))),
                400,
                "above the limit",
            ),
            "gzip bomb (1400^3 claimed, 256 MiB of zeros)": (
                _b64(gzip_bomb(256, (1400, 1400, 1400), with_data=False)),
                400,
                "above the limit",
            ),
            "oversize payload (6 MB)": ("A" * (8 << 20), 400, "above the limit"),
            "zeros after a valid volume (256 MiB)": (_b64(gzip_bomb(256)), 200, ""),
        }
        for name, (text, status, words) in payloads.items():
            t0 = time.perf_counter()
            got, body = post(port, {"dataframe_records": [{"volume": text}]})
            took = time.perf_counter() - t0
            assert got == status and words in json.dumps(body), (name, body)
            assert "Traceback" not in json.dumps(body) and "stack_trace" not in body, (name, body)
            if status != 200:
                assert "\n" not in body["message"] and str(ROOT) not in body["message"], (name, body)
            assert took < 2, (name, took)
        got, body = post(port, {"dataframe_records": [{"volume": scan}]})  # and it still answers
        assert got == 200 and body["predictions"][0]["volume_score"] >= 0
