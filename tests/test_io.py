"""Loaders, geometry round trips on the input's own grid, and every bad-input case."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_volume, oblique_affine
from writers import WRITERS, write_dicom_series, write_nifti

from anomaly3d_core.config import PreprocessingConfig
from anomaly3d_core.errors import DataError
from anomaly3d_core.io.files import list_inputs, load_volume, scan_stem
from anomaly3d_core.preprocess.preprocessing import Preprocessor
from anomaly3d_core.runner import write_result


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_loader_reads_geometry(fmt, tmp_path):
    array, affine = blob_volume(), oblique_affine()
    if fmt == "dicom":
        array = np.round(array)
    path = WRITERS[fmt](array, affine, tmp_path)
    vol = load_volume(path)
    assert vol.shape == array.shape
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_allclose(vol.array, array, atol=1e-3)
    assert vol.spacing == pytest.approx((1.2, 0.9, 2.5), abs=1e-4)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_score_maps_land_on_input_grid(fmt, tmp_path, fitted):
    """The written score map and mask have the input's shape and affine, for every format."""
    array, affine = blob_volume((30, 34, 22), seed=3), oblique_affine()
    if fmt == "dicom":
        array = np.round(array)
    vol = load_volume(WRITERS[fmt](array, affine, tmp_path))
    result = fitted.score(vol)
    write_result(result, tmp_path / "out")
    stem = scan_stem(vol.path)
    for kind in ("score", "mask"):
        img = nib.load(tmp_path / "out" / f"{stem}_{kind}.nii.gz")
        assert img.shape == array.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    assert np.isfinite(result.score_map).all() and result.score_map.max() > 0
    assert result.score_map[array == 0].max() == 0  # nothing outside the head


def test_preprocessing_inverse_is_exact_on_oblique_grid():
    array, affine = blob_volume((30, 34, 22), seed=5), oblique_affine()
    from anomaly3d_core.io.volume import Volume

    cfg = PreprocessingConfig(target_spacing=None, normalize_method="none", clip_percentile=None)
    prep = Preprocessor(cfg)(Volume(array, affine))
    back = Preprocessor.invert(prep.array, prep.record, order=0)
    assert back.shape == array.shape
    np.testing.assert_allclose(back[array != 0], array[array != 0], rtol=1e-6)
    # the preprocessed grid's affine points every voxel at the same world position
    i, j, k = np.argwhere(prep.array == prep.array.max())[0]
    world = prep.affine @ [i, j, k, 1]
    src = np.linalg.inv(affine) @ world
    assert array[tuple(np.round(src[:3]).astype(int))] == prep.array.max()


def test_resampled_inverse_keeps_geometry():
    from scipy import ndimage

    from anomaly3d_core.io.volume import Volume

    array, affine = blob_volume((30, 34, 22), seed=6), oblique_affine()
    smooth = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(array.shape), 3)
    array = np.where(array > 0, 100 + 500 * smooth, 0).astype(np.float32)
    prep = Preprocessor(PreprocessingConfig(target_spacing=(2.0, 2.0, 2.0), clip_percentile=None))(
        Volume(array, affine)
    )
    assert prep.spacing == pytest.approx((2.0, 2.0, 2.0), rel=0.15)
    back = Preprocessor.invert(prep.array, prep.record, order=1)
    inside = ndimage.binary_erosion(array != 0, iterations=2)  # away from the interpolated border
    assert np.corrcoef(back[inside], array[inside])[0, 1] > 0.99


def test_dicom_series_uid_choice(tmp_path):
    array, affine = np.round(blob_volume()), oblique_affine()
    folder = write_dicom_series(array, affine, tmp_path, "mixed", series_uid="1.2.3.4")
    write_dicom_series(array + 5, affine, tmp_path, "mixed", series_uid="1.2.3.5")
    with pytest.raises(
        DataError, match=r"2 DICOM series in one folder; choose one with series_uid: .*1\.2\.3\.4"
    ):
        load_volume(folder)
    from anomaly3d_plugins.loaders.dicom import DicomLoader

    vol = DicomLoader(series_uid="1.2.3.5").load(folder)
    assert vol.meta["series_uid"] == "1.2.3.5" and vol.shape == array.shape


def test_numpy_without_sidecar_warns_identity(tmp_path):
    np.save(tmp_path / "plain.npy", blob_volume())
    with pytest.warns(UserWarning, match="no affine sidecar .* using identity"):
        vol = load_volume(tmp_path / "plain.npy")
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    assert vol.meta["affine_source"] == "identity"


def _corrupt_nifti(tmp_path):
    good = write_nifti(blob_volume(), np.eye(4), tmp_path, "good")
    data = gzip.decompress(good.read_bytes())
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(gzip.compress(data[: len(data) // 3]))
    return bad


def _tiny_brain() -> np.ndarray:
    """A brain at about 1e-38 (near 32-bit floating point's smallest normal) with a block three times brighter."""
    arr = np.where(
        blob_volume() > 0, 1e-38 * (1 + 0.1 * np.random.default_rng(0).random(blob_volume().shape)), 0
    )
    arr[10:14, 10:14, 8:12] = 3e-38
    return arr.astype(np.float32)


BAD_INPUTS = {
    "truncated NIfTI": (_corrupt_nifti, r"truncated.nii.gz: .*(corrupt|truncated)"),
    "unsupported extension": (
        lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt",
        r"notes.txt: unsupported file type '.txt'",
    ),
    "2D data": (
        lambda d: (np.save(d / "flat.npy", np.ones((8, 8))), d / "flat.npy")[1],
        r"flat.npy: 2D data",
    ),
    "4D data": (
        lambda d: (np.save(d / "series.npy", np.random.rand(6, 6, 6, 3)), d / "series.npy")[1],
        r"series.npy: 4D data holding 3 volumes",
    ),
    "NaN voxels": (
        lambda d: write_nifti(np.where(blob_volume() > 0, np.nan, 0).astype(np.float32), np.eye(4), d, "nan"),
        r"nan.nii.gz: \d+ voxels are NaN or Inf",
    ),
    "Inf voxels": (
        lambda d: write_nifti(np.full((6, 6, 6), np.inf, np.float32), np.eye(4), d, "inf"),
        r"inf.nii.gz: 216 voxels are NaN or Inf",
    ),
    "constant volume": (
        lambda d: write_nifti(np.full((6, 6, 6), 3.0, np.float32), np.eye(4), d, "const"),
        r"const.nii.gz: constant volume",
    ),
    "constant brain on zero background": (
        lambda d: write_nifti(
            np.where(blob_volume() > 0, 700.0, 0.0).astype(np.float32), np.eye(4), d, "flat"
        ),
        r"flat.nii.gz: constant foreground intensity \(every non-zero voxel is 700\): no tissue contrast",
    ),
    "tiny intensities with a brighter block": (
        lambda d: write_nifti(_tiny_brain(), np.eye(4), d, "tiny"),
        r"tiny.nii.gz: intensities reach at most 3e-38, below 1e-15: so small that normalisation is meaningless",
    ),
    "empty volume": (
        lambda d: (np.save(d / "empty.npy", np.zeros((0, 4, 4))), d / "empty.npy")[1],
        r"empty.npy: empty volume",
    ),
    "missing file": (lambda d: d / "nope.nii.gz", r"nope.nii.gz: file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_clear_message(case, tmp_path, recwarn):
    make, pattern = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(DataError, match=pattern) as err:
        load_volume(path)
    assert "\n" not in str(err.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*folder is empty of readable scans"):
        list_inputs(tmp_path / "empty")


def test_list_inputs_finds_scans_and_dicom_dirs(tmp_path):
    write_nifti(blob_volume(), np.eye(4), tmp_path, "a")
    np.save(tmp_path / "b.npy", blob_volume())
    np.save(tmp_path / "b.affine.npy", np.eye(4))
    write_dicom_series(np.round(blob_volume()), np.eye(4), tmp_path, "dcm")
    names = [p.name for p in list_inputs(tmp_path)]
    assert names == ["a.nii.gz", "b.npy", "dcm"]


def test_registration_to_mni_and_back(demo_dir):
    from anomaly3d_core.io.volume import Volume
    from anomaly3d_core.preprocess.registration import mni152_reference

    src = load_volume(sorted((demo_dir / "train").iterdir())[0])
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = src.shape[0] - 1
    theta = np.deg2rad(12)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    moved = Volume(
        src.array[::-1].copy(), rot @ src.affine @ flip, "moved.nii.gz"
    )  # non-canonical, rotated in the world
    prep = Preprocessor(
        PreprocessingConfig(register_to="mni152", target_spacing=None, crop_foreground=False, pad_multiple=1)
    )(moved)
    ref = mni152_reference()
    assert prep.array.shape == ref.shape and np.allclose(prep.affine, ref.affine)
    brain = ref.array > 0
    assert np.corrcoef(prep.array[brain], ref.array[brain])[0, 1] > 0.7
    back = Preprocessor.invert(prep.array, prep.record)
    inside = ndimage_erode(moved.array > 0)
    assert back.shape == moved.shape
    assert np.corrcoef(back[inside], moved.array[inside])[0, 1] > 0.9


def ndimage_erode(mask):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=2)


def test_dicom_series_chosen_from_config(tmp_path):
    from anomaly3d_core.config import build_config
    from anomaly3d_core.errors import ConfigError

    array, affine = np.round(blob_volume()), oblique_affine()
    folder = write_dicom_series(array, affine, tmp_path, "mixed", series_uid="1.2.3.4")
    write_dicom_series(array + 5, affine, tmp_path, "mixed", series_uid="1.2.3.5")
    cfg = build_config({"data": {"loader": "dicom", "loader_args": {"series_uid": "1.2.3.5"}}})
    assert cfg.data.loader_args == {"series_uid": "1.2.3.5"}
    with pytest.raises(
        ConfigError, match=r"data.loader_args.series_id: unknown key .*did you mean 'series_uid'"
    ):
        build_config({"data": {"loader": "dicom", "loader_args": {"series_id": "1"}}})
    with pytest.raises(ConfigError, match="needs a named data.loader"):
        build_config({"data": {"loader_args": {"series_uid": "1"}}})
    vol = load_volume(folder, "dicom", loader_args={"series_uid": "1.2.3.5"})
    assert vol.meta["series_uid"] == "1.2.3.5"
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    assert AnomalyDetectionPipeline(cfg).read(folder).meta["series_uid"] == "1.2.3.5"
