"""Hostile input, second pass (issue 20): no file read or written outside what the user named, model
folders from others stay inert, bounded configs and archives, no silent wrong results. Each test
reproduces one reported attack and fails on the code before the fix."""

from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import FAST, blob_volume
from servers import mlflow_server, post
from writers import write_dicom_series

from anomaly3d_core import safe_yaml
from anomaly3d_core.cli import main
from anomaly3d_core.errors import ConfigError, DataError
from anomaly3d_core.io.files import check_volume, load_volume, save_nifti
from anomaly3d_core.io.subjects import manifest_subjects
from anomaly3d_core.mlops import pyfunc_model
from anomaly3d_core.mlops.rows import write_maps
from anomaly3d_core.mlops.serving import read_payload
from anomaly3d_core.persistence import load_any_config, load_detector
from anomaly3d_core.runner import score_files, write_result

SECRET = bytes(range(7, 71)) * 4  # 256 bytes a server must never send back


def _mha(data_file: str) -> bytes:
    return (
        "ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_UCHAR\n"
        f"ElementDataFile = {data_file}\n"
    ).encode()


def _nrrd(data_file: str) -> bytes:
    return f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 4\nencoding: raw\ndata file: {data_file}\n\n".encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    return gzip.compress(img.to_bytes())


# ------------------------------------------------------------ 1. files a payload names
def test_served_model_never_reads_a_file_a_payload_header_names(saved_model, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    attacks = [
        {"volume": _b64(_mha(str(secret))), "format": "mha"},
        {"volume": _b64(_nrrd("../" * 12 + str(secret).lstrip("/"))), "format": "nrrd"},
        {"volume": _b64(_mha(str(tmp_path / "no_such_file.raw")))},  # sniffed, and no existence oracle
    ]
    t0 = time.perf_counter()
    with mlflow_server(saved_model, tmp_path) as port:
        answers = [post(port, {"dataframe_records": [row]}) for row in attacks]
    for status, body in answers:
        assert status == 400, body
        assert "names a separate data file" in body["message"]
        assert str(secret) not in body["message"] and "no_such_file" not in body["message"]
    assert time.perf_counter() - t0 < 120


def test_local_header_may_not_reach_outside_its_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "scan.raw").write_bytes(blob_volume((8, 8, 4)).astype(np.uint8).tobytes())
    (data / "scan.mhd").write_bytes(_mha("scan.raw"))
    assert load_volume(data / "scan.mhd").shape == (8, 8, 4)  # a detached header with its data beside it
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "scan.mhd").write_bytes(_mha("../data/scan.raw"))
    (outside / "link.raw").symlink_to(data / "scan.raw")
    (outside / "linked.mhd").write_bytes(_mha("link.raw"))
    for header in ("scan.mhd", "linked.mhd"):
        with pytest.raises(DataError, match="outside the header's folder.*ANOMALY3D_ALLOW_EXTERNAL_DATA=1"):
            load_volume(outside / header)
    monkeypatch.setenv("ANOMALY3D_ALLOW_EXTERNAL_DATA", "1")
    assert load_volume(outside / "scan.mhd").shape == (8, 8, 4)  # the user allowed it
    with pytest.raises(DataError, match="names a separate data file"):  # never for a payload
        read_payload(_mha(str(data / "scan.raw")), "mha")


# ------------------------------------------------------------ 2. names derived from input
def test_subject_names_never_write_outside_out(fitted, demo_dir, tmp_path):
    manifest = tmp_path / "manifest.csv"
    scan = sorted((demo_dir / "test").iterdir())[0]
    manifest.write_text(
        "subject,sequence,path\n"
        f"../../escape,T1w,{scan}\n/abs/escape,T1w,{scan}\nok-01,T1w,{scan}\n"
        f"ok-02,T1w,{scan}\n"
    )
    subjects, errors = manifest_subjects(manifest, ["T1w"])
    assert [s.subject for s in subjects] == ["ok-01", "ok-02"]
    assert len(errors) == 2 and all("cannot name outputs" in str(e) for e in errors)
    assert "'../../escape'" in str(errors[0]) and "line 2" in str(errors[0])
    # the Python API, Spark and serving rows name outputs too: each name is checked where it is written
    result = fitted.score(scan)
    out = tmp_path / "deep" / "out"
    for stem in ("../../escape", str(tmp_path / "abs")):
        with pytest.raises(DataError, match="outside"):
            write_result(result, out, stem)
        with pytest.raises(DataError, match="outside"):
            write_maps(result, str(out), stem)
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "up").symlink_to(tmp_path)
    with pytest.raises(DataError, match="through a link"):
        write_result(result, out, "sub/up/escape")
    assert not list(tmp_path.glob("escape*")) and not list(tmp_path.glob("abs*"))


# ------------------------------------------------------------ 3. a model folder's settings
def test_model_folder_cannot_choose_where_records_go(saved_model, demo_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    config = next(model.rglob("config.yaml"))
    tree = yaml.safe_load(config.read_text())
    attacker = tmp_path / "attacker.db"
    tree["tracking"] = {"enabled": True, "tracking_uri": f"sqlite:///{attacker}", "experiment_name": "loot"}
    config.write_text(yaml.safe_dump(tree))
    user = tmp_path / "user.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{user}")
    args = ["evaluate", "--model", str(model), "--input", str(demo_dir / "test")]
    args += ["--masks", str(demo_dir / "test_masks"), "--out", str(tmp_path / "ev")]
    assert main(args) == 0
    assert not attacker.exists()
    with sqlite3.connect(user) as db:
        names = [r[0] for r in db.execute("select name from experiments")]
        runs = db.execute("select count(*) from runs").fetchone()[0]
    assert "loot" not in names and "anomaly3d" in names and runs == 1
    # the user's own --set tracking.* decides instead
    assert main([*args[:-1], str(tmp_path / "ev2"), "--set", "tracking.enabled=false"]) == 0
    with sqlite3.connect(user) as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1


# ------------------------------------------------------------ 4. YAML alias bombs
BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "training:\n  num_epochs: *i\n"
)  # a validation message or a config dump would expand it


def test_yaml_alias_bombs_are_refused_at_once(saved_model, tmp_path, capsys):
    assert len(BOMB) < 650  # 9^9 = 387 million strings once expanded
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="alias"):
        load_any_config(cfg)
    code = main(["fit", "--config", str(cfg), "--train", str(tmp_path), "--out", str(tmp_path / "m")])
    assert code != 0 and "aliases expand to over 100,000 values" in capsys.readouterr().err
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    next(model.rglob("config.yaml")).write_text(BOMB)
    with pytest.raises(Exception, match="alias"):
        load_detector(model)
    assert time.perf_counter() - t0 < 5
    # anchors for honest reuse (and those yaml.safe_dump writes for repeated objects) still load
    cfg.write_text("training: {<<: &base {num_epochs: 3}, batch_size: 64}\ntracking: {enabled: false}\n")
    config = load_any_config(cfg)
    assert (config.training.num_epochs, config.training.batch_size) == (3, 64)
    repeated = {"k": [1, 2]}
    text = yaml.safe_dump({"a": repeated, "b": repeated})
    assert "*id001" in text and safe_yaml.load(text) == {"a": repeated, "b": repeated}


# ------------------------------------------------------------ 5. model files that inflate
def test_model_archives_that_inflate_are_refused_before_inflating(saved_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    inner = next(model.rglob("state.json")).parent
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 15, 1 << 15)}
    )  # 4 GiB claimed
    with zipfile.ZipFile(inner / "normative.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mean.npy", header.getvalue() + bytes(1 << 20))
        z.writestr("std.npy", header.getvalue() + bytes(1 << 20))
    assert (inner / "normative.npz").stat().st_size < 100_000
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="above the limit"):
        load_detector(model)
    assert time.perf_counter() - t0 < 1.0
    weights = inner / "weights.pt"
    with zipfile.ZipFile(weights, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", bytes(1 << 20))
        info = z.infolist()[0]
    raw = bytearray(weights.read_bytes())  # declare 2 GiB for the member, as a crafted archive would
    assert info.file_size == 1 << 20
    raw = raw.replace((1 << 20).to_bytes(4, "little"), (1 << 31).to_bytes(4, "little"))
    weights.write_bytes(bytes(raw))
    (inner / "normative.npz").unlink()
    with pytest.raises(DataError, match="inflates to 2,147,483,648 bytes"):
        load_detector(model)


# ------------------------------------------------------------ 6. silent wrong results
def test_extreme_intensities_and_nan_scores_are_never_a_decision(fitted, demo_dir, tmp_path, monkeypatch):
    scan = sorted((demo_dir / "test").iterdir())[0]
    import nibabel as nib

    img = nib.load(scan)
    data = img.get_fdata(dtype=np.float32)
    data[data > np.percentile(data, 90)] = 3e38
    data[data < np.percentile(data, 5)] = -3e38
    bad = save_nifti(data, img.affine, tmp_path / "in" / "huge.nii.gz")
    with pytest.raises(DataError, match="intensities reach 3e\\+38"):
        load_volume(bad)
    with pytest.raises(DataError, match="intensities reach"):  # the same check for a served payload
        check_volume(read_payload(_nifti_bytes(data, img.affine)))
    batch = score_files(fitted, [bad, scan], tmp_path / "out")
    assert len(batch.rows) == 1 and "intensities reach" in batch.failures.items[0][1]
    # a NaN from anywhere in scoring fails the scan instead of reading as normal
    monkeypatch.setattr(type(fitted), "score_prepared", lambda self, prep: np.full(prep.mask.shape, np.nan))
    with pytest.raises(DataError, match="NaN or infinite voxel scores; no decision made"):
        fitted.score(scan)


def _series(tmp_path: Path) -> Path:
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    return write_dicom_series(blob_volume((20, 20, 12)) * 10, affine, tmp_path, "series")


def test_dicom_series_with_duplicated_missing_or_truncated_slices_is_refused(tmp_path):
    ok = _series(tmp_path / "ok")
    assert load_volume(ok).shape == (20, 20, 12)
    dup = _series(tmp_path / "dup")
    first = sorted(dup.iterdir())[5]
    shutil.copy(first, dup / ("zz_" + first.name))
    with pytest.raises(DataError, match="lie at the same position.*duplicated slice"):
        load_volume(dup)
    gap = _series(tmp_path / "gap")
    sorted(gap.iterdir())[6].unlink()
    with pytest.raises(DataError, match="6.00 mm apart where the others are 3.00 mm: 1 slice"):
        load_volume(gap)
    cut = _series(tmp_path / "cut")
    victim = sorted(cut.iterdir())[4]
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(DataError) as info:
        load_volume(cut)
    assert "slice" in str(info.value) and str(cut) in str(info.value) or victim.name in str(info.value)


# ------------------------------------------------------------ 7. a tracking server that does not answer
def test_a_silent_tracking_server_fails_fit_at_once(demo_dir, tmp_path, monkeypatch, capsys):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    port = listener.getsockname()[1]
    monkeypatch.setenv("ANOMALY3D_TRACKING_TIMEOUT", "0.5")
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(yaml.safe_dump({**FAST, "tracking": {"enabled": True}}))
    t0 = time.perf_counter()
    try:
        args = ["fit", "--config", str(cfg), "--train", str(demo_dir / "train"), "--out", str(tmp_path / "m")]
        code = main([*args, "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"])
    finally:
        listener.close()
    err = capsys.readouterr().err
    assert code != 0 and f"tracking server http://127.0.0.1:{port} does not answer" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()
    assert time.perf_counter() - t0 < 5  # refused before training


# ------------------------------------------------------------ 8. hangs and leftovers
def test_a_plugin_that_hangs_at_import_is_named_and_ends_the_command(tmp_path):
    site = tmp_path / "site"
    (site / "hang_pkg-0.1.dist-info").mkdir(parents=True)
    (site / "hang_pkg-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hang-pkg\nVersion: 0.1\n"
    )
    (site / "hang_pkg-0.1.dist-info" / "entry_points.txt").write_text("[anomaly3d]\nmain = hang_plugin\n")
    (site / "hang_plugin.py").write_text("import time\ntime.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": str(site), "ANOMALY3D_PLUGIN_IMPORT_TIMEOUT": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "anomaly3d_core", "plugins"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "plugin package 'hang-pkg' has not finished importing 'hang_plugin' after 1 s" in proc.stderr
    assert "ANOMALY3D_DISABLE_PLUGINS=hang-pkg" in proc.stderr and "Traceback" not in proc.stderr
    assert time.perf_counter() - t0 < 60


def test_served_requests_queue_and_stop_at_their_deadline(saved_model, demo_dir, monkeypatch):
    model = mlflow.pyfunc.load_model(str(saved_model))
    scans = sorted((demo_dir / "test").iterdir())
    rows = pd.DataFrame({"volume": [_b64(p.read_bytes()) for p in scans[:2]]})
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "30")
    assert len(model.predict(rows)) == 2
    # one slot per process by default: a second request waits, and past its deadline is answered 503
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0.3")
    slot = pyfunc_model._slots.setdefault(1, threading.BoundedSemaphore(1))
    slot.acquire()
    try:
        with pytest.raises(Exception, match="busy with other requests") as info:
            model.predict(rows)
        assert info.value.get_http_status_code() == 503
    finally:
        slot.release()
    # rows left when the deadline passes are not scored (the client already has its timeout)
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0.000001")
    with pytest.raises(Exception, match="ran past its"):
        model.predict(rows)
    monkeypatch.setenv("ANOMALY3D_ALLOW_PATHS", "1")
    out = model.predict(pd.DataFrame({"path": [str(p) for p in scans[:3]]}))
    assert list(out["error"].str.startswith("not scored: the request ran past")) == [True] * 3


def test_tiny_voxels_are_refused_not_scored_empty(saved_model, demo_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    save_nifti(blob_volume((40, 40, 40)), np.diag([0.001, 0.001, 0.001, 1.0]), inputs / "tiny.nii.gz")
    shutil.copy(sorted((demo_dir / "test").iterdir())[0], inputs)
    out = tmp_path / "out"
    assert main(["score", "--model", str(saved_model), "--input", str(inputs), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "tiny.nii.gz: voxel size 0.001 x 0.001 x 0.001 mm is below 0.01 mm" in err
    assert not list(out.glob("tiny*")) and len(list(out.glob("*_score.nii.gz"))) == 1


def test_small_scans_that_resample_to_nothing_are_refused(fitted, tmp_path):
    path = save_nifti(blob_volume((12, 12, 12)), np.diag([0.05, 0.05, 0.05, 1.0]), tmp_path / "small.nii.gz")
    with pytest.raises(DataError, match="resamples to a 1 x 1 x 1 grid, under 4 voxels"):
        fitted.prepare(path)
