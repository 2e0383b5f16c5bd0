"""Registration to a template: quality figures, recovery of a known affine, warnings on garbage.

To stay fast, the template in the first two tests is the MNI152 template block-averaged to 4 mm
and the scans are on the 2 mm grid; one test runs the real template through the preprocessor.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from anomaly3d_core.config import PreprocessingConfig
from anomaly3d_core.io.sitk_geometry import image_to_volume, volume_to_image
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess import registration as reg
from anomaly3d_core.preprocess.preprocessing import Preprocessor, PreprocessRecord


def shrink(volume: Volume, factor: int = 2) -> Volume:
    return image_to_volume(
        sitk.BinShrink(volume_to_image(volume.array, volume.affine), [factor] * 3), volume.path
    )


@pytest.fixture(scope="module")
def tiny_template() -> reg.Template:
    ref = reg.mni152_reference()
    brain = shrink(Volume((ref.array > 0).astype(np.float32), ref.affine)).array > 0.5
    return reg.Template.from_volume(shrink(ref), brain, name="mni152-4mm")


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = out @ r
    return out


def mapping_error_mm(params: list[float], world: np.ndarray, brain_points: np.ndarray) -> np.ndarray:
    """Distance between where the fitted transform and the truth send each template point."""
    lps = np.diag([-1.0, -1.0, 1.0])
    matrix, translation, centre = (
        np.reshape(params[:9], (3, 3)),
        np.array(params[9:12]),
        np.array(params[12:]),
    )
    p = brain_points @ lps  # RAS -> LPS (diagonal, its own inverse)
    fitted = (p - centre) @ matrix.T + centre + translation
    truth = (brain_points @ world[:3, :3].T + world[:3, 3]) @ lps
    return np.linalg.norm(fitted - truth, axis=1)


def test_known_rotation_and_translation_recovered(tiny_template, caplog):
    ref = reg.mni152_reference()
    world = np.eye(4)
    world[:3, :3] = rotation((6.0, -4.0, 9.0)) @ np.diag([1.04, 0.97, 1.0])
    world[:3, 3] = [7.0, -5.0, 4.0]
    scan = Volume(ref.array, world @ ref.affine, "moved.nii.gz")  # its content moved by `world`
    with caplog.at_level(logging.WARNING, logger=reg.__name__):
        fit = reg.register(scan, tiny_template)
    affine = tiny_template.volume.affine
    points = np.argwhere(tiny_template.brain) @ affine[:3, :3].T + affine[:3, 3]
    error = mapping_error_mm(fit.params, world, points)
    assert error.mean() < 0.5 and error.max() < 1.0, (error.mean(), error.max())  # template voxels: 4 mm
    assert fit.dice > 0.95 and fit.metric < reg.POOR_METRIC, fit.quality
    assert fit.array.shape == tiny_template.volume.shape
    assert not caplog.records


def test_garbage_gets_low_quality_and_a_warning(tiny_template, caplog):
    noise = np.random.default_rng(0).uniform(0, 100, (60, 70, 60)).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -72.0]
    with caplog.at_level(logging.WARNING, logger=reg.__name__):
        fit = reg.register(Volume(noise, affine, "scans/garbage.nii.gz"), tiny_template)
    assert fit.dice < reg.POOR_DICE and fit.metric > reg.POOR_METRIC, fit.quality
    assert any(
        "scans/garbage.nii.gz" in r.getMessage() and "poor registration" in r.getMessage()
        for r in caplog.records
    )


def test_quality_in_the_preprocessing_record_of_an_aligned_scan(caplog):
    """The real MNI152 template; the scan is the template itself at 4 mm, shifted by 5 mm."""
    coarse = shrink(reg.mni152_reference())
    shift = np.eye(4)
    shift[:3, 3] = [5.0, 0.0, -3.0]
    scan = Volume(coarse.array, shift @ coarse.affine, "aligned.nii.gz")
    cfg = PreprocessingConfig(
        register_to="mni152", target_spacing=None, crop_foreground=False, pad_multiple=1
    )
    with caplog.at_level(logging.WARNING, logger=reg.__name__):
        prep = Preprocessor(cfg)(scan)
    quality = reg.registration_quality(prep)
    assert set(quality) == set(reg.QUALITY_KEYS)
    assert quality["registration_dice"] > 0.95 and quality["registration_metric"] < -0.7, quality
    assert not caplog.records
    # the figures survive the record's JSON round trip (the preprocessing cache stores it)
    again = PreprocessRecord.from_dict(json.loads(json.dumps(prep.record.to_dict())))
    assert again == prep.record and reg.registration_quality(again) == quality
    # not registered: no figures
    plain = Preprocessor(PreprocessingConfig(target_spacing=None))(scan)
    assert reg.registration_quality(plain) == {} and plain.record.registration_dice is None


def test_a_fit_repeats_exactly():
    """Registration and co-registration give the same transform every time (one SimpleITK thread;
    with several, ITK's metric sums vary with thread timing and so do the fits)."""
    from conftest import blob_volume, oblique_affine

    from anomaly3d_core.preprocess.sequences import onto_reference

    ref = reg.reference("mni152")
    moved = ref.affine.copy()
    moved[:3, 3] += [3.0, -2.0, 1.0]
    scan = Volume(np.asarray(ref.array, np.float32) * 900 + 5, moved)
    assert reg.register(scan).params == reg.register(scan).params
    shifted = oblique_affine()
    shifted[:3, 3] += 2.0
    other, base = Volume(blob_volume(seed=4), oblique_affine()), Volume(blob_volume(seed=4), shifted)
    np.testing.assert_array_equal(
        onto_reference(other, base, True, "s", "FLAIR")[0], onto_reference(other, base, True, "s", "FLAIR")[0]
    )
