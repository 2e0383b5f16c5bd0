"""The native-space demo generator: deterministic, varied grids and units, masks aligned with scans."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from anomaly3d_core.demo import native
from anomaly3d_core.demo.datasets import make_demo_dataset, mni_atlas
from anomaly3d_core.errors import ConfigError

SOURCE_MM = 4.0  # a coarse template grid keeps the test fast; native grids are 1-2 mm regardless
KINDS = (None, "haemorrhage", "infarct")


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]


@pytest.fixture(scope="module")
def atlas():
    return mni_atlas(SOURCE_MM)


@pytest.fixture(scope="module")
def subjects(atlas):
    return [
        native.make_native_subject(atlas, np.random.default_rng([11, i]), kind, SOURCE_MM)
        for i, kind in enumerate(KINDS)
    ]


def test_deterministic_for_a_seed(atlas, subjects) -> None:
    again = native.make_native_subject(atlas, np.random.default_rng([11, 0]), None, SOURCE_MM)
    assert np.array_equal(again.image, subjects[0].image)
    assert np.array_equal(again.affine, subjects[0].affine)
    other = native.make_native_subject(atlas, np.random.default_rng([12, 0]), None, SOURCE_MM)
    assert other.image.shape != again.image.shape or not np.array_equal(other.image, again.image)


def test_grids_vary() -> None:
    box = np.array([[-70.0, -105.0, -50.0], [70.0, 70.0, 80.0]])  # a head-sized cloud of points
    sizes, axcodes, stacks = set(), set(), set()
    for i in range(40):
        affine, shape, info = native._native_grid(np.random.default_rng(i), box, np.zeros((0, 3)))
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
        assert np.all((spacing >= 1.0) & (spacing <= 2.5)) and len(shape) == 3
        # axis-aligned: each array axis runs along exactly one world axis
        assert sorted(np.argmax(np.abs(affine[:3, :3]), axis=0).tolist()) == [0, 1, 2]
        assert np.count_nonzero(affine[:3, :3]) == 3
        sizes.add(tuple(sorted(np.round(spacing, 2))))
        axcodes.add(info["axcodes"])
        stacks.add(info["stack"])
    assert (1.0, 1.0, 2.5) in sizes and (1.2, 1.2, 2.0) in sizes and (1.0, 1.0, 1.0) in sizes
    assert any(len(set(s)) == 1 and s[0] > 1.0 for s in sizes)  # isotropic, coarser than 1 mm
    assert len(axcodes) >= 10  # many axis orders and flips
    assert stacks == {"axial", "coronal", "sagittal"}


def test_mask_aligned_with_scan_and_world(atlas, subjects) -> None:
    for i, (kind, sub) in enumerate(zip(KINDS, subjects, strict=True)):
        assert sub.mask.shape == sub.image.shape
        brain = sub.image != 0
        assert not (sub.mask & ~brain).any()
        if kind is None:
            assert not sub.mask.any()
            continue
        # the lesion lies where the pose puts the template-space lesion (same random stream)
        _, _, lesion = native.template_subject(atlas, np.random.default_rng([11, i]), kind, SOURCE_MM)
        pose = np.array(sub.info["pose"])
        expected = pose[:3, :3] @ world_centroid(lesion, atlas.affine) + pose[:3, 3]
        assert np.linalg.norm(world_centroid(sub.mask, sub.affine) - expected) < 1.5
        # canonical (RAS) reorientation by nibabel keeps the lesion in the same world place
        canon = nib.as_closest_canonical(nib.Nifti1Image(sub.mask.astype(np.uint8), sub.affine))
        assert nib.aff2axcodes(canon.affine) == ("R", "A", "S")
        got = world_centroid(np.asarray(canon.dataobj) > 0, canon.affine)
        assert np.allclose(got, world_centroid(sub.mask, sub.affine), atol=1e-3)
        # and the scan shows the lesion voxel for voxel: bright haemorrhage, dark infarct
        ratio = float(np.mean(sub.image[sub.mask])) / float(np.median(sub.image[brain & ~sub.mask]))
        assert ratio > 1.2 if kind == "haemorrhage" else ratio < 0.8


def test_intensity_units_and_background(subjects) -> None:
    medians = []
    for sub in subjects:
        brain = sub.image != 0
        assert 0.2 < brain.mean() < 0.8  # skull-stripped: zero background, nonzero brain
        medians.append(float(np.median(sub.image[brain])))
    assert max(medians) / min(medians) > 2.0
    assert len({sub.info["voxel_size"] for sub in subjects}) > 1
    assert len({sub.info["axcodes"] for sub in subjects}) > 1


def test_make_demo_dataset_native(tmp_path) -> None:
    out = make_demo_dataset(
        tmp_path / "native",
        "tiny",
        seed=2,
        voxel_size=SOURCE_MM,
        space="native",
        n_train=0,
        n_test_normal=0,
        n_test_anomalous=1,
    )
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert rows[0]["lesion_kind"] == "tumour" and rows[0]["axcodes"] and rows[0]["voxel_size"]
    scan = nib.load(str(out / "test" / "sub-100.nii.gz"))
    mask = nib.load(str(out / "test_masks" / "sub-100.nii.gz"))
    assert scan.shape == mask.shape and np.allclose(scan.affine, mask.affine)
    assert "".join(nib.aff2axcodes(scan.affine)) == rows[0]["axcodes"]
    assert np.asarray(mask.dataobj).any()
    with pytest.raises(ConfigError):
        make_demo_dataset(tmp_path / "x", "tiny", space="mni")
