"""The data survey behind the preset advice: template space or scans in their own space."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import oblique_affine

from anomaly3d_core.io.files import list_inputs
from anomaly3d_core.preprocess.registration import mni152_reference
from anomaly3d_core.preprocess.survey import RECOMMENDED, in_template_space, survey


def test_template_grids_and_native_grids_are_told_apart(demo_dir, tmp_path):
    ref = mni152_reference()
    assert in_template_space(ref.shape, ref.affine, ref)
    shifted = ref.affine.copy()
    shifted[:3, 3] += 15.0  # a head 15 mm off the template's field of view
    assert not in_template_space(ref.shape, shifted, ref)
    assert not in_template_space(ref.shape, oblique_affine(), ref)

    demo = survey(list_inputs(demo_dir / "train"), ref)
    assert demo.template_space and demo.n_scans == 4
    assert "brain_mri.yaml (normative scoring) suits them" in demo.advice(True, "none")

    # a multi-site set: the demo scans plus a sagittal 1x1x2.5 mm scan in its own pose
    paths = list(list_inputs(demo_dir / "train"))
    affine = oblique_affine()
    nib.save(nib.Nifti1Image(np.ones((20, 30, 10), np.float32), affine), tmp_path / "site2.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti")
    mixed = survey([*paths, tmp_path / "site2.nii.gz", tmp_path / "garbage.nii.gz"], ref)
    assert not mixed.template_space and not mixed.shared_grid
    assert mixed.n_scans == 5 and mixed.n_template == 4 and len(mixed.unreadable) == 1
    assert "5 scan(s) on 2 grid(s), 2 voxel sizes (0.9-4 mm)" in mixed.describe()
    assert "register_to: auto" in mixed.advice(True, "none")
    assert "registers each one" in mixed.advice(True, "auto")
    assert "brain_mri.yaml adds normative scoring" in mixed.advice(False, "none")
    # the recommended preset follows the kind of data: space and sequences (README, Which preset)
    for found, space in ((demo, "template"), (mixed, "native")):
        for sequences, label in (([], "one sequence"), (["T1w", "FLAIR"], "T1w + FLAIR")):
            preset = RECOMMENDED[f"{space}, {label}"][0]
            assert f"Recommended for {space}, {label}: experiments/configs/{preset} (" in found.advice(
                True, "auto", sequences
            )


def test_recommended_presets_are_the_validation_picks_of_the_committed_benchmarks():
    """``fit``'s advice names, per kind of data, the preset ``experiments/recommend.py`` picks by
    validation AP from the results in ``experiments/results`` (no test figure takes part)."""
    results = Path(__file__).resolve().parents[1] / "experiments" / "results"
    picks = {e["kind"]: e["preset"] for e in json.loads((results / "recommendation.json").read_text())}
    assert set(picks) == set(RECOMMENDED)
    for kind, (preset, _) in RECOMMENDED.items():
        assert (configs := results.parent / "configs" / preset).is_file(), configs
        assert picks[kind] == preset, f"{kind}: advice names {preset}, the validation picked {picks[kind]}"


def test_register_to_auto_registers_only_scans_outside_template_space(demo_dir):
    from anomaly3d_core.config import PreprocessingConfig
    from anomaly3d_core.io.files import load_volume
    from anomaly3d_core.io.volume import Volume
    from anomaly3d_core.preprocess.preprocessing import Preprocessor

    auto = Preprocessor(PreprocessingConfig(register_to="auto"))
    template_scan = load_volume(list_inputs(demo_dir / "train")[0])
    assert auto.registration_target(template_scan) is None
    native_scan = Volume(np.ones((20, 30, 10), np.float32), oblique_affine())
    assert auto.registration_target(native_scan) == "mni152"
    assert Preprocessor(PreprocessingConfig(register_to="none")).registration_target(native_scan) is None
    assert (
        Preprocessor(PreprocessingConfig(register_to="mni152")).registration_target(template_scan) == "mni152"
    )
