"""The saved model is an MLflow pyfunc model, served for real by ``mlflow models serve``."""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from writers import WRITERS

from anomaly3d_core.mlops.serving import decode_nifti


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_pyfunc_predict_in_process(saved_model, demo_dir):
    model = mlflow.pyfunc.load_model(str(saved_model))
    scan = sorted((demo_dir / "test").iterdir())[-1]
    out = model.predict(pd.DataFrame({"volume": [_b64(scan)]}))
    assert list(out.columns) == ["volume_score", "is_anomalous", "threshold", "score_map"]
    img = decode_nifti(out.loc[0, "score_map"])
    src = nib.load(scan)
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    # uncompressed .nii works too
    raw = base64.b64encode(gzip.decompress(scan.read_bytes())).decode()
    assert model.predict(pd.DataFrame({"volume": [raw]})).loc[0, "volume_score"] == pytest.approx(
        out.loc[0, "volume_score"]
    )
    meta = (saved_model / "MLmodel").read_text()
    assert "signature" in meta and (saved_model / "input_example.json").is_file()
    assert any(
        line.startswith("anomaly3d==") for line in (saved_model / "requirements.txt").read_text().splitlines()
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers(saved_model, demo_dir, tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "serve.log", "w")
    # mlflow starts uvicorn by name, so the venv's bin must be on PATH, as it is in an activated venv
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "models",
            "serve",
            "-m",
            str(saved_model),
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("server did not start:\n" + (tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(1)
        scan = sorted((demo_dir / "test").iterdir())[-1]
        status, body = _post(port, {"dataframe_records": [{"volume": _b64(scan)}]})
        assert status == 200, body
        row = body["predictions"][0]
        assert set(row) == {"volume_score", "is_anomalous", "threshold", "score_map"}
        assert decode_nifti(row["score_map"]).shape == nib.load(scan).shape
        # any format a loader plugin reads, named in the request; the score map is NIfTI on its grid
        img = nib.load(scan)
        nrrd = WRITERS["itk-nrrd"](np.asarray(img.dataobj, np.float32), img.affine, tmp_path, "scan")
        status, body = _post(port, {"dataframe_records": [{"volume": _b64(nrrd), "format": "nrrd"}]})
        assert status == 200, body
        assert decode_nifti(body["predictions"][0]["score_map"]).shape == img.shape
        status, body = _post(port, {"dataframe_records": [{"volume": "definitely not base64!"}]})
        assert 400 <= status < 500 and "not valid base64" in json.dumps(body)
        status, body = _post(port, {"dataframe_records": [{"volume": base64.b64encode(b"hello").decode()}]})
        assert 400 <= status < 500 and "NIfTI" in json.dumps(body)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_pyfunc_batch_rows_paths_uris_and_errors_per_row(
    saved_model, fitted, demo_dir, tmp_path, monkeypatch
):
    """A request with ``path``/``out_dir`` scores every row it can and gives the others their own error."""
    import fsspec
    from mlflow.exceptions import MlflowException

    from anomaly3d_core.mlops.schema import RESPONSE_COLUMNS
    from anomaly3d_core.runner import write_result

    model = mlflow.pyfunc.load_model(str(saved_model))
    scan = sorted((demo_dir / "test").iterdir())[-1]
    monkeypatch.delenv("ANOMALY3D_ALLOW_PATHS", raising=False)
    with pytest.raises(
        MlflowException, match="ANOMALY3D_ALLOW_PATHS=1"
    ) as err:  # a server reads no files by default
        model.predict(pd.DataFrame({"path": [str(scan)]}))
    assert err.value.get_http_status_code() == 400
    monkeypatch.setenv("ANOMALY3D_ALLOW_PATHS", "1")
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/in/scan.nii.gz", scan.read_bytes())
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    request = pd.DataFrame(
        {
            "path": [str(scan), str(tmp_path / "bad.nii.gz"), "memory://in/scan.nii.gz", None, None],
            "volume": [None, None, None, _b64(scan), "definitely not base64!"],
            "out_dir": [str(tmp_path / "out"), None, "memory://out", str(tmp_path / "b64"), None],
        }
    )
    out = model.predict(request)
    assert list(out.columns) == list(RESPONSE_COLUMNS)
    assert list(out["error"] != "") == [False, True, False, False, True]
    assert "not valid base64" in out.loc[4, "error"] and out.loc[1, "file"] == str(tmp_path / "bad.nii.gz")
    assert out.loc[0, "volume_score"] == out.loc[2, "volume_score"] == out.loc[3, "volume_score"]
    # the maps written for a path equal those `anomaly3d score` writes, voxel for voxel
    expected = write_result(fitted.score(fitted.read(scan)), tmp_path / "cli", "sub")
    for column, name in (("score_map", expected["score_map"]), ("mask", expected["mask"])):
        got, want = nib.load(out.loc[0, column]), nib.load(tmp_path / "cli" / name)
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        assert np.array_equal(got.affine, want.affine)
        assert (
            fs.cat_file(out.loc[2, column].removeprefix("memory://")) == Path(out.loc[0, column]).read_bytes()
        )
    assert out.loc[2, "score_map"] == "memory://out/scan_score.nii.gz"
    assert (
        Path(out.loc[3, "score_map"]).parent == tmp_path / "b64"
    )  # a base64 row's maps, named by its content


def test_pyfunc_model_is_loaded_once_per_process(saved_model):
    """Spark loads the pyfunc model for every partition; the detector behind it is read once."""
    first = mlflow.pyfunc.load_model(str(saved_model)).unwrap_python_model().pipeline
    second = mlflow.pyfunc.load_model(str(saved_model)).unwrap_python_model().pipeline
    assert first is second
