"""The saved model is an MLflow pyfunc model, served for real by ``mlflow models serve``."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from servers import mlflow_server, post
from writers import WRITERS

from anomaly3d_core.mlops.schema import INLINE_COLUMNS
from anomaly3d_core.mlops.serving import decode_nifti


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_pyfunc_predict_in_process(saved_model, demo_dir):
    model = mlflow.pyfunc.load_model(str(saved_model))
    scan = sorted((demo_dir / "test").iterdir())[-1]
    out = model.predict(pd.DataFrame({"volume": [_b64(scan)]}))
    assert tuple(out.columns) == INLINE_COLUMNS
    assert {"volume_threshold", "p_value", "alpha", "voxel_threshold"} <= set(INLINE_COLUMNS)
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


@pytest.mark.slow
def test_mlflow_models_serve_answers(saved_model, demo_dir, tmp_path):
    with mlflow_server(saved_model, tmp_path) as port:
        scan = sorted((demo_dir / "test").iterdir())[-1]
        status, body = post(port, {"dataframe_records": [{"volume": _b64(scan)}]})
        assert status == 200, body
        row = body["predictions"][0]
        assert set(row) == set(INLINE_COLUMNS)
        assert decode_nifti(row["score_map"]).shape == nib.load(scan).shape
        # any format a loader plugin reads, named in the request; the score map is NIfTI on its grid
        img = nib.load(scan)
        nrrd = WRITERS["itk-nrrd"](np.asarray(img.dataobj, np.float32), img.affine, tmp_path, "scan")
        status, body = post(port, {"dataframe_records": [{"volume": _b64(nrrd), "format": "nrrd"}]})
        assert status == 200, body
        assert decode_nifti(body["predictions"][0]["score_map"]).shape == img.shape
        status, body = post(port, {"dataframe_records": [{"volume": "definitely not base64!"}]})
        assert 400 <= status < 500 and "not valid base64" in json.dumps(body)
        status, body = post(port, {"dataframe_records": [{"volume": base64.b64encode(b"hello").decode()}]})
        assert 400 <= status < 500 and "NIfTI" in json.dumps(body)


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
