"""The deformable step after the affine registration: a known smooth warp, its inverse, the config switch."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from anomaly3d_core.config import build_config
from anomaly3d_core.errors import ConfigError
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess import registration as reg
from anomaly3d_core.preprocess.preprocessing import PreprocessingConfig, Preprocessor


@pytest.fixture(scope="module")
def warped() -> tuple[Volume, np.ndarray]:
    """The template under a known smooth warp (up to 4 mm) and a shift: a scan, and its template-grid truth."""
    ref = reg.template("mni152").volume
    rng = np.random.default_rng(0)
    shape = ref.shape
    disp = []
    for _ in range(3):
        coarse = rng.standard_normal((4, 5, 4))
        d = ndimage.zoom(coarse, [s / n for s, n in zip(shape, coarse.shape, strict=True)], order=3)
        disp.append(2.0 * d[: shape[0], : shape[1], : shape[2]] / np.abs(d).max())  # voxels of 2 mm
    idx = np.indices(shape).astype(np.float32)
    array = ndimage.map_coordinates(ref.array, [idx[i] + disp[i] for i in range(3)], order=1)
    affine = ref.affine.copy()
    affine[:3, 3] += [3.0, -2.0, 1.5]
    return Volume(array.astype(np.float32), affine, "warped.nii.gz"), ref.array


@pytest.fixture(scope="module")
def fits(warped) -> dict[bool, reg.Registration]:
    scan, _ = warped
    return {d: reg.register(scan, "mni152", deformable=d) for d in (False, True)}


def test_deformable_recovers_a_smooth_warp_better_than_affine_alone(warped, fits) -> None:
    _, truth = warped
    brain = reg.template("mni152").brain
    error = {d: float(np.abs(f.array - truth)[brain].mean()) for d, f in fits.items()}
    assert error[True] < 0.8 * error[False]
    assert fits[True].dice >= fits[False].dice and fits[True].metric < fits[False].metric
    assert fits[False].deformation is None and fits[True].deformation is not None
    assert 0.2 < fits[True].displacement_mm < 6.0


def test_inverse_brings_a_map_back_onto_the_native_grid(warped, fits) -> None:
    scan, truth = warped
    ref = reg.template("mni152").volume
    error = {}
    for d, f in fits.items():  # the template itself, as a "map", should land on the warped scan
        back = reg.to_native(truth, ref.affine, f.params, scan.shape, scan.affine, 1, f.deformation)
        assert back.shape == scan.shape
        error[d] = float(np.abs(back - scan.array)[scan.array > 0].mean())
    assert error[True] < 0.8 * error[False]


def test_preprocessor_records_and_inverts_the_deformable_step(warped) -> None:
    scan, _ = warped
    pre = Preprocessor(
        PreprocessingConfig(register_to="mni152", deformable=True, crop_foreground=False, pad_multiple=1)
    )
    prepared = pre(scan)
    assert prepared.record.deformation is not None and prepared.record.registration_displacement_mm > 0
    again = type(prepared.record).from_dict(prepared.record.to_dict())
    back = Preprocessor.invert(prepared.mask.astype(np.float32), again, order=0)
    assert back.shape == scan.shape
    overlap = (back > 0.5) & (scan.array > 0)
    assert overlap.sum() > 0.9 * (scan.array > 0).sum()


def test_deformable_needs_registration() -> None:
    with pytest.raises(ConfigError, match="deformable step follows the affine"):
        build_config({"data": {"preprocessing": {"deformable": True}}})
    assert build_config({"data": {"preprocessing": {"register_to": "auto", "deformable": True}}})
