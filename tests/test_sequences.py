"""Subjects with several sequences: grouping (BIDS, manifest, folder), one grid, channels, outputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import FAST
from scipy import ndimage

from anomaly3d_core.errors import ConfigError, DataError
from anomaly3d_core.io.data import list_items
from anomaly3d_core.io.files import save_nifti
from anomaly3d_core.io.subjects import bids_subjects, folder_subjects, manifest_subjects, parse_bids_name
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.preprocessing import Preprocessor, resized_affine
from anomaly3d_core.preprocess.sequences import coverage, onto_reference, stack_sequences

SEQS = {**FAST, "data": {**FAST["data"], "sequences": ["T1w", "FLAIR"], "cache": False}}


def _subject(seed: int, lesion: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 4 mm T1 from the demo anatomy, a FLAIR-like image of the same head, their affine and the lesion."""
    from anomaly3d_core.demo.anatomy import make_subject, mni_atlas

    atlas = mni_atlas(4.0)
    t1, _ = make_subject(atlas, np.random.default_rng(seed), None, 4.0)
    brain = t1 > 0
    flair = np.where(
        brain, 1500.0 - 0.5 * t1 + 30 * np.random.default_rng(seed + 7).standard_normal(t1.shape), 0
    )
    lesion_mask = np.zeros(t1.shape, bool)
    if lesion:  # visible in FLAIR only: bright there, unchanged in T1
        centre = np.argwhere(ndimage.binary_erosion(brain, iterations=4))[len(np.argwhere(brain)) // 3]
        grid = np.indices(t1.shape)
        lesion_mask = (sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= 4) & brain
        flair = np.where(lesion_mask, flair * 2.2, flair)
    return t1.astype(np.float32), flair.astype(np.float32), atlas.affine, lesion_mask


def _thick(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image on a grid with slices twice as thick along the last axis (as a 2D FLAIR)."""
    shape = (array.shape[0], array.shape[1], array.shape[2] // 2)
    out = ndimage.zoom(array, np.divide(shape, array.shape), order=1)
    return out.astype(np.float32), resized_affine(affine, array.shape, shape)


def write_bids(
    root: Path, n: int, first_seed: int = 0, lesion: bool = False, sessions: bool = False
) -> list[str]:
    """A BIDS dataset of ``n`` subjects with T1w (4 mm) and FLAIR (8 mm slices); returns subject labels."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    labels = []
    for i in range(n):
        t1, flair, affine, mask = _subject(first_seed + i, lesion)
        label = f"{first_seed + i:02d}"
        folder = root / f"sub-{label}" / ("ses-1/anat" if sessions else "anat")
        stem = f"sub-{label}" + ("_ses-1" if sessions else "")
        save_nifti(t1, affine, folder / f"{stem}_T1w.nii.gz")
        save_nifti(*_thick(flair, affine), folder / f"{stem}_FLAIR.nii.gz")
        if lesion:
            save_nifti(mask.astype(np.uint8), affine, root.parent / f"{root.name}_masks" / f"{stem}.nii.gz")
        labels.append(label)
    return labels


def test_bids_names_and_grouping(tmp_path: Path) -> None:
    assert parse_bids_name("sub-01_ses-2_acq-fast_FLAIR.nii.gz") == (
        {"sub": "01", "ses": "2", "acq": "fast"},
        "FLAIR",
    )
    assert parse_bids_name("ses-2_sub-01_T1w.nii.gz") is None  # sub comes first
    assert parse_bids_name("sub-01_T1w.json") is None
    write_bids(tmp_path / "bids", 3, sessions=True)
    (tmp_path / "bids" / "sub-00/ses-1/anat/sub-00_ses-1_FLAIR.nii.gz").unlink()  # missing sequence
    extra = tmp_path / "bids" / "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz"  # two T1w files
    extra.write_bytes((tmp_path / "bids" / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz").read_bytes())
    subjects, errors = bids_subjects(tmp_path / "bids", ["T1w", "FLAIR"])
    assert [s.stem for s in subjects] == ["sub-02_ses-1"]
    assert set(subjects[0].files) == {"T1w", "FLAIR"}
    text = "\n".join(str(e) for e in errors)
    assert "sub-00_ses-1: no FLAIR file for this subject (it has: T1w)" in text
    assert "sub-01_ses-1: 2 T1w files" in text and "run-2" in text


def test_manifest_and_folder(tmp_path: Path) -> None:
    t1, flair, affine, _ = _subject(0)
    for name in ("a_T1w", "a_FLAIR", "b_T1w"):
        save_nifti(t1 if "T1w" in name else flair, affine, tmp_path / "flat" / f"{name}.nii.gz")
    subjects, errors = folder_subjects(tmp_path / "flat", ["T1w", "FLAIR"])
    assert [s.stem for s in subjects] == ["a"] and "b: no FLAIR file" in str(errors[0])
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "subject,session,sequence,path\n"
        "p1,,T1w,flat/a_T1w.nii.gz\np1,,FLAIR,flat/a_FLAIR.nii.gz\n"
        "p2,,T1w,flat/b_T1w.nii.gz\np2,,FLAIR,flat/a_FLAIR.nii.gz\np2,,FLAIR,flat/a_T1w.nii.gz\n"
        "p3,,,flat/b_T1w.nii.gz\n"
    )
    subjects, errors = manifest_subjects(manifest, ["T1w", "FLAIR"])
    assert [s.stem for s in subjects] == ["p1"] and subjects[0].files["T1w"] == tmp_path / "flat/a_T1w.nii.gz"
    assert "m.csv: line 7: empty sequence; the row is skipped" in str(errors[0])
    assert "p2: 2 files claim its FLAIR" in str(errors[1])
    (tmp_path / "bad.csv").write_text("subject,path\nx,y\n")
    with pytest.raises(DataError, match="lacks column.*sequence"):
        manifest_subjects(tmp_path / "bad.csv", ["T1w"])
    with pytest.raises(DataError, match="BIDS dataset: set data.sequences"):
        write_bids(tmp_path / "bids", 1)
        list_items(tmp_path / "bids", [])


def test_sequences_on_the_reference_grid(tmp_path: Path) -> None:
    """A FLAIR on thicker slices, shifted by head motion, lands on the T1 grid; co-registration undoes the motion."""
    t1, flair, affine, _ = _subject(3)
    moved = affine.copy()
    moved[:3, 3] += [4.0, -3.0, 2.0]  # the head moved 5.4 mm between the two sequences...
    thick, thick_affine = _thick(flair, moved)  # ...and the FLAIR has 8 mm slices
    ref, other = Volume(t1, affine, "t1"), Volume(thick, thick_affine, "flair")
    assert coverage(ref, other) > 0.9
    still, _ = onto_reference(Volume(*_thick(flair, affine)), ref, False, "s", "FLAIR")  # no motion
    truth = still[t1 > 0]
    fitted, info = onto_reference(other, ref, True, "s", "FLAIR")
    plain, _ = onto_reference(other, ref, False, "s", "FLAIR")
    err_fit = np.abs(fitted[t1 > 0] - truth).mean()
    err_plain = np.abs(plain[t1 > 0] - truth).mean()
    assert fitted.shape == t1.shape
    assert 4.0 < info["shift_mm"] < 7.0, info  # the motion found
    assert err_fit < 0.3 * err_plain, (err_fit, err_plain)
    stacked = stack_sequences({"T1w": ref, "FLAIR": other}, ["T1w", "FLAIR"], True, "s")
    assert stacked.array.shape == (*t1.shape, 2) and stacked.shape == t1.shape and stacked.channels == 2
    np.testing.assert_array_equal(stacked.channel(0), t1)
    aligned = Volume(flair, affine, "aligned")  # on the reference grid already: auto leaves it as it is
    same, info = onto_reference(aligned, ref, "auto", "s", "FLAIR")
    np.testing.assert_array_equal(same, flair)
    assert info == {"rotation_deg": 0.0, "shift_mm": 0.0}
    auto, info = onto_reference(other, ref, "auto", "s", "FLAIR")  # another grid: auto co-registers
    np.testing.assert_array_equal(auto, fitted)
    far = Volume(flair, np.array(affine) + np.array([[0, 0, 0, 300.0]] * 3 + [[0, 0, 0, 0]]), "far")
    with pytest.raises(DataError, match=r"s: its FLAIR scan covers 0% of the T1w scan's field of view"):
        stack_sequences({"T1w": ref, "FLAIR": far}, ["T1w", "FLAIR"], True, "s")


def test_coregistration_is_the_first_step_of_the_chain() -> None:
    """Reading leaves each sequence on its own grid; the ``coregister`` step stacks them on the
    reference grid exactly as reading did before, records each fit and inverts as the identity."""
    from anomaly3d_core.config import PreprocessingConfig
    from anomaly3d_core.io.subjects import as_subject
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline
    from anomaly3d_core.preprocess.sequences import SubjectScans, read_subject

    t1, flair, affine, _ = _subject(3)
    moved = affine.copy()
    moved[:3, 3] += [4.0, -3.0, 2.0]
    ref, other = Volume(t1, affine, "t1"), Volume(*_thick(flair, moved), "flair")
    scans = read_subject(as_subject({"T1w": ref, "FLAIR": other}), ["T1w", "FLAIR"], lambda v: v)
    assert isinstance(scans, SubjectScans) and scans.channels == 2 and scans.shape == t1.shape
    assert scans.sequences["FLAIR"] is other  # nothing resampled while reading
    pre = Preprocessor(PreprocessingConfig(target_spacing=None), coregister=True)
    assert pre.working_grid(scans.shape, scans.affine) == t1.shape  # the reference grid: limits unchanged
    prep = pre(scans)
    entry = prep.record.steps[0]
    assert entry["name"] == "coregister" and entry["args"] == {"coregister": True}
    fit = entry["record"]["coregistration"]["FLAIR"]
    assert entry["record"]["sequences"] == ["T1w", "FLAIR"]
    assert 4.0 < fit["shift_mm"] < 7.0 and len(fit["transform"]) == 9, fit
    before = stack_sequences({"T1w": ref, "FLAIR": other}, ["T1w", "FLAIR"], True, "subject-0")
    np.testing.assert_array_equal(prep.source.array, before.array)  # the source: sequences stacked
    assert prep.channels == 2 and prep.source.meta["coregistration"]["FLAIR"] == fit
    scores = np.random.default_rng(0).random(t1.shape).astype(np.float32)
    assert pre.steps[0].invert(scores, entry["record"]) is scores  # maps are on the reference grid
    assert Preprocessor.invert(np.ones(prep.shape, np.float32), prep.record).shape == t1.shape
    # a scan on one grid passes with an empty record; data.coregister is part of the cache key
    assert Preprocessor(PreprocessingConfig(target_spacing=None))(ref).record.steps[0]["record"] == {}
    keys = [
        AnomalyDetectionPipeline({**SEQS, "data": {**SEQS["data"], "coregister": c}}) for c in (True, "auto")
    ]
    assert keys[0].preprocessor.key()[0]["args"] == {"coregister": True}
    assert keys[0].preprocessor.key() != keys[1].preprocessor.key()
    aligned = keys[0].read_aligned({"T1w": ref, "FLAIR": other})
    np.testing.assert_array_equal(aligned.array, before.array)


def test_channels_normalised_each_and_moved_together() -> None:
    from anomaly3d_core.config import AugmentationConfig
    from anomaly3d_core.preprocess.augmentation import augment_from_config

    t1, flair, affine, _ = _subject(1)
    vol = Volume(np.stack([t1, flair * 50], -1), affine)
    prep = Preprocessor()(vol)
    assert prep.array.shape[0] == 2 and prep.array.shape[1:] == prep.mask.shape
    for c in range(2):
        inside = prep.array[c][prep.mask]
        assert abs(inside.mean()) < 0.1 and abs(inside.std() - 1) < 0.1  # each sequence on its own scale
    aug = augment_from_config(
        np.stack([prep.array[0], prep.array[0]]),
        AugmentationConfig(enabled=True, rotation_range=15),
        np.random.default_rng(0),
    )
    np.testing.assert_allclose(aug[0], aug[1], atol=1e-5)  # identical channels stay identical: same geometry


def test_extractor_channels_follow_the_sequences() -> None:
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    pipe = AnomalyDetectionPipeline({**SEQS, "extractor": {"type": "simple"}})
    assert pipe.build_network().extractor.in_channels == 2
    pipe = AnomalyDetectionPipeline({**SEQS, "extractor": {"type": "simple", "args": {"in_channels": 1}}})
    with pytest.raises(ConfigError, match="takes 1 input channel.*data.sequences gives 2"):
        pipe.build_network()
    with pytest.raises(ConfigError, match="reference_sequence: 'T2w' is not one of"):
        AnomalyDetectionPipeline({"data": {"sequences": ["T1w", "FLAIR"], "reference_sequence": "T2w"}})
    order = AnomalyDetectionPipeline({"data": {"sequences": ["FLAIR", "T1w"], "reference_sequence": "T1w"}})
    assert order.channels == ["T1w", "FLAIR"]


@pytest.fixture(scope="module")
def bids_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bids")
    write_bids(root / "train", 4)
    write_bids(root / "test", 3, first_seed=50, lesion=True)
    return root


@pytest.fixture(scope="module")
def cli_model(bids_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A T1w+FLAIR model fitted by ``anomaly3d fit`` on the BIDS training set."""
    import yaml

    from anomaly3d_core.cli import main

    folder = tmp_path_factory.mktemp("cli")
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump(SEQS))
    model = folder / "model"
    assert (
        main(["fit", "--config", str(config), "--train", str(bids_data / "train"), "--out", str(model)]) == 0
    )
    return model


def test_cli_on_a_bids_dataset(
    bids_data: Path, cli_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """fit, score and evaluate on BIDS with T1w+FLAIR; outputs form a BIDS-Derivatives dataset."""
    from anomaly3d_core.cli import main

    model = cli_model
    (bids_data / "test" / "sub-52" / "anat" / "sub-52_FLAIR.nii.gz").rename(
        bids_data / "test" / "gone.nii.gz"
    )
    try:
        out = tmp_path / "derivatives" / "anomaly3d"
        code = main(["score", "--model", str(model), "--input", str(bids_data / "test"), "--out", str(out)])
        err = capsys.readouterr().err
    finally:
        (bids_data / "test" / "gone.nii.gz").rename(
            bids_data / "test" / "sub-52" / "anat" / "sub-52_FLAIR.nii.gz"
        )
    assert code == 1 and "sub-52: no FLAIR file" in err
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "anomaly3d"
    relative = Path(os.path.relpath(model.resolve(), out.resolve())).as_posix()  # moves with the folder
    assert desc["GeneratedBy"][0]["Description"].endswith(f"model {relative}")
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:"}] and "://" not in json.dumps(desc)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["subject"] for r in rows] == ["sub-50", "sub-51"]
    score_map = out / "sub-50/anat/sub-50_space-T1w_desc-anomaly_statmap.nii.gz"
    assert rows[0]["score_map"] == "sub-50/anat/sub-50_space-T1w_desc-anomaly_statmap.nii.gz"
    t1 = nib.load(bids_data / "test/sub-50/anat/sub-50_T1w.nii.gz")
    img = nib.load(score_map)
    assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)  # on the reference sequence's grid
    sidecar = json.loads((out / "sub-50/anat/sub-50_space-T1w_desc-anomaly_statmap.json").read_text())
    assert sidecar["Sources"] == [
        "bids:raw:sub-50/anat/sub-50_T1w.nii.gz",
        "bids:raw:sub-50/anat/sub-50_FLAIR.nii.gz",
    ]
    assert sidecar["VolumeScore"] == pytest.approx(float(rows[0]["volume_score"]))
    assert (out / "sub-50/anat/sub-50_space-T1w_desc-anomaly_mask.nii.gz").is_file()
    ev = tmp_path / "ev"
    code = main(
        [
            "evaluate",
            "--model",
            str(model),
            "--input",
            str(bids_data / "test"),
            "--masks",
            str(bids_data / "test_masks"),
            "--out",
            str(ev),
        ]
    )
    assert code == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_volumes"] == 3 and metrics["pixel_auc"] > 0.8  # the FLAIR-only lesions are found


def test_bids_app_outputs_are_indexed_by_pybids(bids_data: Path, cli_model: Path, tmp_path: Path) -> None:
    """participant level for chosen labels, then the group report; pybids' BIDSLayout indexes the
    derivatives: every image with its sidecar, scores.tsv with its column descriptions."""
    bids = pytest.importorskip("bids", reason="pybids is a dev extra (pip install -e '.[dev]')")
    from anomaly3d_core.cli import main

    raw = tmp_path / "raw"
    shutil.copytree(bids_data / "test", raw)
    out = raw / "derivatives" / "anomaly3d"
    common = ["--model", str(cli_model)]
    assert main(["bids", str(raw), str(out), "participant", "--participant-label", "50", *common]) == 0
    assert main(["bids", str(raw), str(out), "participant", "--participant_label", "sub-51", *common]) == 0
    assert main(["bids", str(raw), str(out), "group", *common]) == 0
    layout = bids.BIDSLayout(raw, derivatives=str(out), validate=False)
    maps = layout.get(scope="derivatives", suffix="statmap", desc="anomaly", extension=".nii.gz")
    masks = layout.get(scope="derivatives", suffix="mask", desc="anomaly", extension=".nii.gz")
    assert sorted(m.entities["subject"] for m in maps) == ["50", "51"] and len(masks) == 2
    assert all(m.entities["space"] == "T1w" and m.entities["datatype"] == "anat" for m in maps)
    meta = maps[0].get_metadata()
    assert meta["Sources"][0].startswith("bids:raw:sub-5") and not meta["Model"].startswith("/")
    assert masks[0].get_metadata()["Sources"][0].startswith("bids::sub-5")
    table = (out / "scores.tsv").read_text(encoding="utf-8").splitlines()
    columns = table[0].split("\t")
    assert columns[:2] == ["participant_id", "session_id"] and len(table) == 3
    assert set(columns) == set(json.loads((out / "scores.json").read_text()))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": "../.."} and "://" not in json.dumps(description)
    group = (out / "report.html").read_text(encoding="utf-8")
    assert 'href="sub-50.html"' in group and 'href="sub-51.html"' in group
    assert main(["bids", str(raw), str(out), "participant", "--participant-label", "99", *common]) == 1


def test_bids_app_fits_with_held_out_calibration_subjects(
    bids_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """group --fit --calibration: the p-values come from the calibration subjects (a BIDS dataset)."""
    import yaml

    from anomaly3d_core.cli import main
    from anomaly3d_core.persistence import load_detector

    write_bids(tmp_path / "cal", 2, first_seed=20)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(SEQS))
    model = tmp_path / "model"
    args = [
        "bids",
        str(bids_data / "train"),
        str(tmp_path / "unused"),
        "group",
        "--fit",
        "--config",
        str(config),
    ]
    assert main([*args, "--model", str(model), "--calibration", str(tmp_path / "cal")]) == 0
    assert "calibrated on 2 normal scan(s), too few for alpha 0.05" in capsys.readouterr().out
    assert load_detector(model).postprocessor_.n_calibration == 2
    participant = ["bids", str(bids_data / "test"), str(tmp_path / "d"), "participant", "--model", str(model)]
    assert main([*participant, "--calibration", str(tmp_path / "cal")]) == 2
    assert (
        "--calibration calibrates a model while fitting it: use it with group --fit"
        in capsys.readouterr().err
    )


def test_python_api_with_subject_mappings(bids_data: Path) -> None:
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    train = [
        {"T1w": p, "FLAIR": p.with_name(p.name.replace("T1w", "FLAIR"))}
        for p in sorted((bids_data / "train").glob("sub-*/anat/*_T1w.nii.gz"))
    ]
    pipe = AnomalyDetectionPipeline(SEQS).fit(train, show_progress=False)
    assert pipe.n_train_volumes_ + pipe.n_val_volumes_ >= 4 and not pipe.failures_
    result = pipe.score(train[0])
    assert result.score_map.shape == nib.load(train[0]["T1w"]).shape
    with pytest.raises(DataError, match="one file cannot give the T1w and FLAIR scans"):
        pipe.score(train[0]["T1w"])
    single = AnomalyDetectionPipeline(FAST)
    with pytest.raises(DataError, match="needs data.sequences"):
        single.read(train[0])


def test_served_model_takes_one_column_per_sequence(bids_data: Path, cli_model: Path) -> None:
    import base64

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from anomaly3d_core.persistence import load_detector

    model = mlflow.pyfunc.load_model(str(cli_model))
    assert [c.name for c in model.metadata.get_input_schema().inputs] == [
        *("T1w", "FLAIR", "T1w_path", "FLAIR_path", "subject", "format", "out_dir")
    ]
    anat = bids_data / "test" / "sub-50" / "anat"
    row = {s: base64.b64encode((anat / f"sub-50_{s}.nii.gz").read_bytes()).decode() for s in ("T1w", "FLAIR")}
    out = model.predict(pd.DataFrame([row]))
    expected = load_detector(cli_model).score(
        {"T1w": anat / "sub-50_T1w.nii.gz", "FLAIR": anat / "sub-50_FLAIR.nii.gz"}
    )
    assert out["volume_score"][0] == pytest.approx(expected.volume_score, rel=1e-5)
    with pytest.raises(MlflowException, match="FLAIR"):
        model.predict(pd.DataFrame([{"T1w": row["T1w"]}]))


def test_served_model_of_sequences_writes_maps_per_row_with_out_dir(
    bids_data: Path, cli_model: Path, tmp_path, monkeypatch
) -> None:
    """With ``out_dir`` a request of several sequences is a batch: maps written, a bad row its own error."""
    import base64

    import mlflow.pyfunc
    import nibabel as nib
    import pandas as pd

    monkeypatch.setenv("ANOMALY3D_ALLOW_PATHS", "1")  # out_dir: the model writes files
    model = mlflow.pyfunc.load_model(str(cli_model))
    anat = bids_data / "test" / "sub-50" / "anat"
    row = {s: base64.b64encode((anat / f"sub-50_{s}.nii.gz").read_bytes()).decode() for s in ("T1w", "FLAIR")}
    request = pd.DataFrame(
        [{**row, "out_dir": str(tmp_path)}, {"T1w": row["T1w"], "FLAIR": None, "out_dir": str(tmp_path)}]
    )
    out = model.predict(request)
    assert out["error"][0] == "" and out["subject"][0] == "row 0"
    assert nib.load(out["score_map"][0]).shape == nib.load(anat / "sub-50_T1w.nii.gz").shape
    assert "'FLAIR'" in out["error"][1] and out["score_map"][1] == ""


def test_tune_on_subjects_with_two_sequences(bids_data: Path, tmp_path: Path) -> None:
    """tune reads BIDS subjects; its synthetic validation lesions go into every sequence."""
    import yaml

    from anomaly3d_core.cli import main
    from anomaly3d_core.demo.synthetic import inject_anomalies

    t1, flair, affine, _ = _subject(2)
    vol, mask = inject_anomalies(Volume(np.stack([t1, flair], -1), affine), np.random.default_rng(0))
    assert mask.any() and vol.channels == 2
    for c, original in enumerate((t1, flair)):  # the same voxels change in both sequences, nowhere else
        changed = vol.channel(c) != original
        assert changed[mask].mean() > 0.9 and not changed[~mask].any()
    config = {
        **SEQS,
        "tracking": {"enabled": False},
        "tuning": {
            "n_trials": 1,
            "search_space": {"training.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2}},
        },
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "tuned"
    args = ["tune", "--config", str(path), "--train", str(bids_data / "train"), "--out", str(out)]
    assert main(args) == 0
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["data"]["sequences"] == ["T1w", "FLAIR"]
