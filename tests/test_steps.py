"""Preprocessing as a chain of invertible steps: the chain from the config, records (old and new),
the limits and the cache key from the chain, plugin steps, and the kit's step checks."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, blob_volume, oblique_affine

from anomaly3d_core.config import PreprocessingConfig, build_config
from anomaly3d_core.errors import ConfigError, PluginError
from anomaly3d_core.interfaces import PreprocessingStep, StepState
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.preprocess.preprocessing import Preprocessor, PreprocessRecord, build_chain
from anomaly3d_core.preprocess.steps import BUILTIN_STEPS, Register
from anomaly3d_core.registry import Registry, get_plugin_manager
from anomaly3d_core.testing import ConformanceError, check_component

README = Path(__file__).resolve().parents[1] / "README.md"
BUILTIN = ["coregister", "register", "reorient", "resample", "foreground", "normalize", "crop", "pad"]


def readme_step_plugin() -> types.ModuleType:
    """The preprocessing-step plugin of README's *Writing a plugin*, word for word, as a module."""
    text = README.read_text(encoding="utf-8")
    source = re.search(r"```python\n(# my_steps/__init__\.py\n.*?)```", text, re.S).group(1)
    module = types.ModuleType("my_steps")
    exec(compile(source, "README.md:my_steps", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def registry() -> Registry:
    pm = get_plugin_manager()
    pm.register(readme_step_plugin(), name="my-steps")
    return Registry(pm)


def _volume(seed: int = 5) -> Volume:
    return Volume(blob_volume((30, 34, 22), seed=seed), oblique_affine(), "scan.nii.gz")


def test_chain_follows_the_config_and_extra_steps_go_after_the_step_they_name(registry):
    assert [s.name for s in build_chain(PreprocessingConfig())] == BUILTIN
    assert [cls.name for cls in BUILTIN_STEPS] == BUILTIN
    cfg = PreprocessingConfig(
        steps=[
            {"type": "clip_intensity", "after": "normalize"},
            {"type": "clip_intensity", "args": {"upper_percentile": 90}},
            {"type": "clip_intensity", "args": {"upper_percentile": 95}, "after": "resample"},
        ]
    )
    chain = build_chain(cfg, registry)
    assert [s.name for s in chain] == BUILTIN[:4] + ["clip_intensity"] * 2 + BUILTIN[4:6] + [
        "clip_intensity"
    ] + BUILTIN[6:]
    assert [s.params.upper_percentile for s in chain if s.name == "clip_intensity"] == [90, 95, 99]
    # the built-ins take their parameters from the config's keys
    pad = build_chain(PreprocessingConfig(pad_multiple=16, normalize_method="none"))[-1]
    assert pad.params.multiple == 16 and pad.params.normalized is False


def test_each_step_records_itself_and_the_chain_inverts_to_the_scan_grid():
    prep = Preprocessor()(_volume())
    assert [e["name"] for e in prep.record.steps] == BUILTIN
    assert prep.record.entry("reorient")["transform"] != [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]  # oblique: LPI
    shape_out = prep.record.entry("resample")["shape_out"]
    assert prep.record.entry("crop")["shape_in"] == shape_out
    back = Preprocessor.invert(np.ones(prep.shape, np.float32), prep.record, order=0)
    assert back.shape == (30, 34, 22) and back.max() == 1
    again = PreprocessRecord.from_dict(json.loads(json.dumps(prep.record.to_dict())))
    assert again == prep.record and again.registration is None
    np.testing.assert_array_equal(
        Preprocessor.invert(prep.array, again, order=1), Preprocessor.invert(prep.array, prep.record)
    )


def _flat(record: PreprocessRecord) -> dict:
    """The flat record the preprocessing wrote before the chain, for the same scan."""
    e = record.entry
    return {
        "original_shape": list(record.original_shape),
        "original_affine": record.original_affine,
        "to_canonical": e("reorient")["transform"],
        "canonical_shape": e("resample")["shape_in"],
        "resampled_shape": e("resample")["shape_out"],
        "crop_start": e("crop")["start"],
        "crop_stop": e("crop")["stop"],
        "pad_before": e("pad")["before"],
        "pad_after": e("pad")["after"],
        "registration": None,
        "reference_affine": None,
        "registration_dice": None,
        "registration_metric": None,
        "deformation": None,
        "registration_displacement_mm": None,
    }


@pytest.mark.parametrize("reorient", [True, False])
def test_a_record_of_before_the_chain_still_inverts_bit_for_bit(reorient):
    prep = Preprocessor(PreprocessingConfig(reorient=reorient))(_volume(seed=7))
    old = PreprocessRecord.from_dict(json.loads(json.dumps(_flat(prep.record))))
    assert [e["name"] for e in old.steps] == BUILTIN[
        1:
    ]  # no co-registration entry: it inverts as the identity
    scores = np.random.default_rng(0).random(prep.shape).astype(np.float32)
    for order in (0, 1):
        np.testing.assert_array_equal(
            Preprocessor.invert(scores, old, order=order, fill=-1.0),
            Preprocessor.invert(scores, prep.record, order=order, fill=-1.0),
        )


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"target_spacing": 3.0},
        {"target_shape": [20, 24, 16]},
        {"reorient": False},
        {"target_spacing": None},
    ],
)
def test_the_working_grid_for_the_limits_is_the_grid_the_chain_resamples_to(cfg):
    pre = Preprocessor(PreprocessingConfig(**cfg))
    volume = _volume()
    prep = pre(volume)
    assert pre.working_grid(volume.shape, volume.affine) == tuple(prep.record.entry("resample")["shape_out"])


def test_the_working_grid_of_a_registered_scan_is_the_template_resampled():
    pre = Preprocessor(PreprocessingConfig(register_to="mni152", target_spacing=4.0))
    ref = Register(register_to="mni152").grid((30, 34, 22), oblique_affine())[0]
    assert pre.working_grid((30, 34, 22), oblique_affine()) == tuple(round(n / 2) for n in ref)


def test_the_cache_key_comes_from_the_chain(registry):
    key = Preprocessor(PreprocessingConfig()).key()
    assert [k["name"] for k in key] == BUILTIN and all("version" in k and "args" in k for k in key)
    assert key == Preprocessor(PreprocessingConfig()).key()
    assert key != Preprocessor(PreprocessingConfig(crop_margin=2)).key()
    extra = Preprocessor(PreprocessingConfig(steps=[{"type": "clip_intensity"}]), registry).key()
    assert [k["name"] for k in extra] == BUILTIN[:4] + ["clip_intensity"] + BUILTIN[4:]


def test_step_config_errors_name_the_key_and_the_choices(registry):
    steps = "data.preprocessing.steps"
    with pytest.raises(
        ConfigError,
        match=rf"{steps}\.0\.type: unknown step 'clip_intensty'; did you mean 'clip_intensity'\?.*available: clip_intensity, coregister, crop",
    ):
        build_config({"data": {"preprocessing": {"steps": [{"type": "clip_intensty"}]}}}, registry=registry)
    with pytest.raises(ConfigError, match=rf"{steps}\.0\.args\.upper_percentile"):
        build_config(
            {
                "data": {
                    "preprocessing": {"steps": [{"type": "clip_intensity", "args": {"upper_percentile": 20}}]}
                }
            },
            registry=registry,
        )
    with pytest.raises(ConfigError, match=rf"{steps}\.0\.after.*'register', 'reorient', 'resample'"):
        build_config(
            {"data": {"preprocessing": {"steps": [{"type": "clip_intensity", "after": "nope"}]}}},
            registry=registry,
        )
    cfg = build_config(
        {"data": {"preprocessing": {"steps": [{"type": "clip_intensity"}]}}}, registry=registry
    )
    assert ("steps", "clip_intensity") in cfg.plugin_specs()  # a saved model records the package it needs


def test_a_plugin_step_from_readme_fits_and_scores(registry, demo_dir, tmp_path):
    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    tree = {**FAST, "data": {"preprocessing": {"target_spacing": 4.0, "steps": [{"type": "clip_intensity"}]}}}
    pipe = AnomalyDetectionPipeline(tree, registry=registry)
    pipe.fit(list_inputs(demo_dir / "train"), show_progress=False)
    scan = list_inputs(demo_dir / "test")[0]
    prep = pipe.prepare(scan)
    assert [e["name"] for e in prep.record.steps] == BUILTIN[:4] + ["clip_intensity"] + BUILTIN[4:]
    plain = AnomalyDetectionPipeline({**FAST, "data": {"preprocessing": {"target_spacing": 4.0}}}).prepare(
        scan
    )
    assert prep.shape == plain.shape and prep.array.max() < plain.array.max()  # clipped before normalising
    result = pipe.score(scan)
    assert result.score_map.shape == pipe.read(scan).shape and np.isfinite(result.score_map).all()
    assert result.score_map.max() > 0
    from anomaly3d_core.errors import Anomaly3DError
    from anomaly3d_core.persistence import load_detector

    folder = pipe.save(tmp_path / "model")
    assert load_detector(folder, registry=registry).score(scan).volume_score == result.volume_score
    with pytest.raises(Anomaly3DError, match=r"needs the step plugin 'clip_intensity' from .*my-steps"):
        load_detector(folder)  # an environment without the plugin is told what to install


class _NoRecord(PreprocessingStep):
    name = "no_record"

    def __call__(self, state: StepState) -> StepState:
        return StepState(
            state.array, state.affine, state.volume, state.mask, state.foreground, state.space, state.records
        )


class _CropsWithoutWayBack(PreprocessingStep):
    name = "crop_no_way_back"

    def __call__(self, state: StepState) -> StepState:
        sl = (slice(1, -1),) * 3
        fg = None if state.foreground is None else state.foreground[sl]
        mask = None if state.mask is None else state.mask[sl]
        return state.evolve(self, array=state.array[sl], foreground=fg, mask=mask)


class _ForgetsTheMask(PreprocessingStep):
    name = "forgets_the_mask"

    def __call__(self, state: StepState) -> StepState:
        return state.evolve(self, array=state.array[1:-1, 1:-1, 1:-1])


def test_the_kit_checks_a_step_for_its_record_its_grid_and_its_way_back():
    for cls in BUILTIN_STEPS:
        check_component(cls)
    with pytest.raises(ConformanceError, match="no_record.*check_step_call.*state.evolve"):
        check_component(_NoRecord)
    with pytest.raises(ConformanceError, match="crop_no_way_back.*check_step_invert.*grid"):
        check_component(_CropsWithoutWayBack)
    with pytest.raises(ConformanceError, match="forgets_the_mask.*check_step_call.*the mask is on a"):
        check_component(_ForgetsTheMask)


def test_the_preprocessor_refuses_a_step_that_drops_its_record(monkeypatch):
    pre = Preprocessor()
    monkeypatch.setattr(
        pre, "_built", (pre.config.model_dump_json(), [*pre.steps[:3], _NoRecord(), *pre.steps[3:]])
    )
    with pytest.raises(PluginError, match="'no_record'.*state.evolve"):
        pre(_volume())
