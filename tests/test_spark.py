"""Scoring on Spark in local mode: the saved model as ``mlflow.pyfunc.spark_udf`` and
``anomaly3d score --engine spark`` give the maps ``anomaly3d score`` writes, voxel for voxel."""

from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly3d_core.cli import main
from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.mlops.serving import save_pyfunc
from anomaly3d_core.runner import score_files

JAVA_HOME = os.environ.get("JAVA_HOME", "")
HAS_JAVA = bool(shutil.which("java") or (JAVA_HOME and Path(JAVA_HOME, "bin", "java").is_file()))
needs_java = pytest.mark.skipif(
    not HAS_JAVA, reason="Spark needs Java 17+: no java on the PATH or in JAVA_HOME"
)


@pytest.fixture(scope="module")
def spark():
    from anomaly3d_core.mlops.spark import spark_session

    session = spark_session("local[2]", "anomaly3d-test")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def cli_maps(fitted, demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    score_files(fitted, list_inputs(demo_dir / "test"), out)
    return out


def _same_maps(score: Path, expected: Path) -> None:
    """The score map and its mask hold the same voxels on the same grid."""

    def mask(p: Path) -> Path:
        return p.with_name(p.name.replace("_score", "_mask"))

    for a, b in ((score, expected), (mask(score), mask(expected))):
        ia, ib = nib.load(a), nib.load(b)
        assert np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj)), (a, b)
        assert np.array_equal(ia.affine, ib.affine) and ia.get_data_dtype() == ib.get_data_dtype()


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: r["file"])


@needs_java
def test_spark_udf_recipe_scores_paths_like_the_cli(spark, saved_model, demo_dir, cli_maps, tmp_path):
    import mlflow.pyfunc
    from pyspark.sql.functions import struct

    scans = sorted(str(p) for p in (demo_dir / "test").iterdir())
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    paths = [*scans, str(tmp_path / "missing.nii.gz"), str(broken)]
    df = spark.createDataFrame(
        [(p, str(tmp_path / "out"), i) for i, p in enumerate(paths)], "path string, out_dir string, id int"
    )
    # the recipe in README, word for word
    udf = mlflow.pyfunc.spark_udf(
        spark,
        str(saved_model),
        env_manager="local",
        extra_env={"ANOMALY3D_ALLOW_PATHS": "1", "ANOMALY3D_TORCH_THREADS": "1"},
    )
    rows = df.withColumn("r", udf(struct("path", "out_dir"))).select("id", "r.*").toPandas().set_index("id")
    assert rows.loc[len(scans), "error"] == "file not found"
    assert rows.loc[0, "decision_rule"] == "volume_score > volume_threshold (uncalibrated)"
    # through score_dataframe a failed row has no decision (null), never "normal"
    from anomaly3d_core.mlops.spark import score_dataframe

    done = score_dataframe(spark, str(saved_model), df.filter("id >= 2")).toPandas().set_index("id")
    failed = done.loc[len(scans)]
    assert failed["error"] == "file not found" and failed["is_anomalous"] is None
    assert np.isnan(failed["p_value"]) and np.isnan(failed["n_lesions"])
    assert done.loc[2, "is_anomalous"] in (True, False) and done.loc[2, "n_lesions"] >= 0
    assert "NIfTI" in rows.loc[len(scans) + 1, "error"] and np.isnan(rows.loc[len(scans) + 1, "volume_score"])
    cli = {r["file"]: r for r in _csv(cli_maps / "scores.csv")}
    for i, scan in enumerate(scans):
        row = rows.loc[i]
        assert row["error"] == "" and row["file"] == scan and row["seconds"] > 0
        assert round(row["volume_score"], 6) == float(cli[scan]["volume_score"])
        assert str(row["is_anomalous"]) == cli[scan]["is_anomalous"]
        _same_maps(Path(row["score_map"]), cli_maps / cli[scan]["score_map"])


@needs_java
def test_score_engine_spark_writes_what_score_writes(
    spark, saved_model, demo_dir, cli_maps, tmp_path, capsys
):
    out = tmp_path / "spark"
    code = main(
        [
            "score",
            "--engine",
            "spark",
            "--model",
            str(saved_model),
            "--input",
            str(demo_dir / "test"),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows, expected = _csv(out / "scores.csv"), _csv(cli_maps / "scores.csv")
    assert rows == expected  # same columns, numbers and map names as on one machine
    for row in rows:
        _same_maps(out / row["score_map"], cli_maps / row["score_map"])
    # a table of paths; a bad row is reported and the others are scored
    table = tmp_path / "scans.csv"
    table.write_text(
        "path\n" + "\n".join([r["file"] for r in rows[:2]] + [str(tmp_path / "gone.nii.gz")]) + "\n"
    )
    code = main(
        [
            "score",
            "--engine",
            "spark",
            "--model",
            str(saved_model),
            "--input",
            str(table),
            "--out",
            str(tmp_path / "t"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "gone.nii.gz: file not found" in err
    assert [r["file"] for r in _csv(tmp_path / "t" / "scores.csv")] == [r["file"] for r in rows[:2]]


def test_engine_spark_without_pyspark_says_how_to_get_it(
    saved_model, demo_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # what an environment without the extra sees
    code = main(
        [
            "score",
            "--engine",
            "spark",
            "--model",
            str(saved_model),
            "--input",
            str(demo_dir / "test"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "pip install 'anomaly3d[spark]'" in capsys.readouterr().err


@needs_java
def test_subjects_with_two_sequences_on_spark(spark, tmp_path):
    """A T1w+FLAIR model scores a BIDS dataset on Spark from per-sequence path columns, as on one machine."""
    from test_sequences import SEQS, write_bids

    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.mlops.spark import score_with_spark
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    write_bids(tmp_path / "train", 4)
    write_bids(tmp_path / "test", 2, first_seed=60, lesion=True)
    (tmp_path / "test" / "sub-61" / "anat" / "sub-61_FLAIR.nii.gz").unlink()  # refused while grouping
    pipe = AnomalyDetectionPipeline(SEQS)
    pipe.fit(list_items(tmp_path / "train", pipe.channels).items, show_progress=False)
    model = pipe.save(tmp_path / "model")  # a plain folder: wrapped as an MLflow model for the workers
    out = tmp_path / "out"
    batch = score_with_spark(str(model), str(tmp_path / "test"), out, spark=spark)
    assert [r["subject"] for r in batch.rows] == ["sub-60"]
    assert "sub-61: no FLAIR file" in batch.failures.report()
    expected = pipe.score(list_items(tmp_path / "test", pipe.channels).items[0])
    got = nib.load(out / "sub-60_score.nii.gz")
    np.testing.assert_allclose(np.asarray(got.dataobj), expected.score_map, rtol=1e-6, atol=1e-6)
    assert np.allclose(got.affine, nib.load(tmp_path / "test/sub-60/anat/sub-60_T1w.nii.gz").affine)
    with pytest.raises(Exception, match="takes a path column per sequence"):
        frame = spark.createDataFrame([(str(out), str(out))], "path string, out_dir string")
        from anomaly3d_core.mlops.spark import score_dataframe

        score_dataframe(spark, str(save_pyfunc(pipe, tmp_path / "mlflow_model")), frame)
