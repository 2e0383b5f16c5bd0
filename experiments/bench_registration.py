"""Registration to MNI152 (``register_to: mni152``): time and accuracy per 1 mm scan, before and after.

    python experiments/bench_registration.py [--out experiments/results] [--quick]

"before" is the registration as it was up to commit aa45608 (one affine Mattes-MI fit on the
whole 1 mm scan, pyramid 8/4/2 mm, regular-step gradient descent, wall-clock sampling seed),
copied below as :func:`register_before`; "after" is ``anomaly3d_core.preprocess.registration``.

Scans (1 mm, about 197x233x189 voxels):

- ``exact``: the 2 mm template upsampled to 1 mm (B-spline), with a bias field and Rician noise;
  its header is then moved by a random affine, so the true transform is known and the error is
  the distance between where the fitted and the true transform send each template brain voxel;
- ``subject``: a synthetic demo subject at 1 mm (own anatomy: smooth deformation, contrast,
  bias, noise), moved the same way; no exact truth, so only the Dice overlap counts.

Two ranges of random affines: ``typical`` (rotations up to 10 degrees, shifts up to 15 mm, scale
+-8 %, shear +-0.03) and ``large`` (20 degrees, 30 mm, +-15 %, +-0.06). Dice: the scan's brain
mask carried to the template grid by the fitted transform against the template's brain mask.
Then clearly wrong inputs (noise, a featureless ellipsoid, a brain upside down) for the quality
figures, and the end-to-end time to score one 1 mm scan with ``brain_mri.yaml`` +
``register_to=mni152`` (warm process, median). Times are wall clock, medians over repeats, on a
machine whose load is recorded (``loadavg``): other jobs share its cores.
Results: ``registration.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from anomaly3d_core.io.sitk_geometry import image_to_volume, volume_to_image  # noqa: E402
from anomaly3d_core.io.volume import Volume  # noqa: E402
from anomaly3d_core.preprocess import registration as reg  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0])
RANGES = {
    "typical": {"rotation": 10.0, "shift": 15.0, "scale": 0.08, "shear": 0.03},
    "large": {"rotation": 20.0, "shift": 30.0, "scale": 0.15, "shear": 0.06},
}


def register_before(volume: Volume, ref: Volume) -> tuple[np.ndarray, list[float]]:
    """The registration before this change (commit aa45608), unchanged."""
    fixed = volume_to_image(ref.array.astype(np.float32), ref.affine)
    moving = volume_to_image(np.asarray(volume.array, np.float32), volume.affine)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, 0)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(init, inPlace=False)
    tx = method.Execute(fixed, moving)
    affine_tx = sitk.AffineTransform(tx.GetNthTransform(0) if isinstance(tx, sitk.CompositeTransform) else tx)
    out = sitk.Resample(moving, fixed, affine_tx, sitk.sitkLinear, 0.0)
    array = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)).astype(np.float32)
    return np.ascontiguousarray(array), [*affine_tx.GetParameters(), *affine_tx.GetFixedParameters()]


def random_affine(rng: np.random.Generator, centre: np.ndarray, rotation, shift, scale, shear) -> np.ndarray:
    """A world (RAS) affine about ``centre``: rotation, anisotropic scale, shear, then a shift."""
    rot = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-rotation, rotation, 3))):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    matrix = matrix @ (np.eye(3) + rng.uniform(-shear, shear, (3, 3)) * (1 - np.eye(3)))
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = centre - matrix @ centre + rng.uniform(-shift, shift, 3)
    return out


def bias_and_noise(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from anomaly3d_core.preprocess.augmentation import smooth_field

    image = image * np.exp(0.12 * smooth_field(image.shape, rng, control=3))
    sigma = 0.025 * float(np.percentile(image[brain], 99))
    image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    return np.where(brain, image, 0.0).astype(np.float32)


def one_mm_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2 mm template and brain mask resampled to a 1 mm grid covering the same box."""
    ref, brain = reg._mni152()
    affine = ref.affine.copy()
    affine[:3, :3] *= 0.5  # same origin: every other 1 mm voxel is a 2 mm template voxel
    grid = volume_to_image(np.zeros(tuple(2 * s - 1 for s in ref.shape), np.float32), affine)
    t1 = sitk.Resample(volume_to_image(ref.array, ref.affine), grid, sitk.Transform(), sitk.sitkBSpline, 0.0)
    mask = sitk.Resample(
        volume_to_image(brain.astype(np.float32), ref.affine), grid, sitk.Transform(), sitk.sitkLinear, 0.0
    )
    mask_arr = image_to_volume(mask).array > 0.5
    t1_arr = np.where(mask_arr, np.clip(image_to_volume(t1).array, 0, None), 0.0).astype(np.float32)
    return t1_arr, mask_arr, affine


def make_cases(n_per_kind: int, seed: int = 0) -> list[dict]:
    from anomaly3d_core.demo.datasets import make_subject, mni_atlas

    ref, brain = reg._mni152()
    centre = (np.argwhere(brain) @ ref.affine[:3, :3].T + ref.affine[:3, 3]).mean(axis=0)
    t1, t1_mask, t1_affine = one_mm_template()
    atlas = mni_atlas(1.0)
    rng = np.random.default_rng(seed)
    cases = []
    for range_name, spec in RANGES.items():
        for k in range(n_per_kind):
            world = random_affine(rng, centre, **spec)
            image = bias_and_noise(t1 * 1000.0, t1_mask, rng)
            cases.append(
                {
                    "name": f"exact-{range_name}-{k}",
                    "range": range_name,
                    "volume": Volume(image, world @ t1_affine, f"exact-{range_name}-{k}.nii.gz"),
                    "truth": world,
                }
            )
        for k in range(n_per_kind):
            world = random_affine(rng, centre, **spec)
            image, _ = make_subject(atlas, rng, None, voxel_size=1.0)
            cases.append(
                {
                    "name": f"subject-{range_name}-{k}",
                    "range": range_name,
                    "volume": Volume(image, world @ atlas.affine, f"subject-{range_name}-{k}.nii.gz"),
                    "truth": None,
                }
            )
    return cases


def accuracy(case: dict, params: list[float]) -> dict:
    ref, brain = reg._mni152()
    out = {}
    if case["truth"] is not None:
        points = np.argwhere(brain) @ ref.affine[:3, :3].T + ref.affine[:3, 3]
        matrix, translation, centre = (
            np.reshape(params[:9], (3, 3)),
            np.array(params[9:12]),
            np.array(params[12:]),
        )
        fitted = (points @ LPS - centre) @ matrix.T + centre + translation
        world = case["truth"]
        truth = (points @ world[:3, :3].T + world[:3, 3]) @ LPS
        error = np.linalg.norm(fitted - truth, axis=1)
        out["error_mean_mm"] = round(float(error.mean()), 3)
        out["error_max_mm"] = round(float(error.max()), 3)
    vol = case["volume"]
    warped = reg.register_mask(np.asarray(vol.array) > 0, vol.affine, ref, params)
    out["brain_dice"] = round(float(2 * (warped & brain).sum() / (warped.sum() + brain.sum())), 4)
    return out


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, times


def bench_cases(cases: list[dict], repeats: int, repeats_before: int) -> list[dict]:
    ref = reg.mni152_reference()
    tpl = reg.template("mni152")
    rows = []
    for case in cases:
        vol = case["volume"]
        (arr_b, params_b), t_before = timed(lambda vol=vol: register_before(vol, ref), repeats_before)
        fit, t_after = timed(lambda vol=vol: reg.register(vol, "mni152"), repeats)
        row = {
            "case": case["name"],
            "range": case["range"],
            "before": {
                "seconds": round(statistics.median(t_before), 2),
                **accuracy(case, params_b),
                "registration_dice": round(reg._foreground_dice(arr_b, tpl.brain), 4),
            },
            "after": {
                "seconds": round(statistics.median(t_after), 2),
                **accuracy(case, fit.params),
                **fit.quality,
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for which in ("before", "after"):
        r = [row[which] for row in rows]
        errors = [x["error_mean_mm"] for x in r if "error_mean_mm" in x]
        out[which] = {
            "median_seconds": round(statistics.median(x["seconds"] for x in r), 2),
            "error_mean_mm": round(float(np.mean(errors)), 3),
            "error_worst_case_mean_mm": round(max(errors), 3),
            "error_max_mm": round(max(x["error_max_mm"] for x in r if "error_max_mm" in x), 3),
            "brain_dice_mean": round(float(np.mean([x["brain_dice"] for x in r])), 4),
            "brain_dice_min": round(min(x["brain_dice"] for x in r), 4),
            "failures_error_over_2mm_or_dice_under_0.95": sum(
                x.get("error_mean_mm", 0) > 2.0 or x["brain_dice"] < 0.95 for x in r
            ),
        }
    return out


def bad_inputs(cases: list[dict]) -> list[dict]:
    """Clearly wrong inputs: what the quality figures say, and whether a warning is logged."""
    good = next(c for c in cases if c["name"].startswith("exact"))["volume"]
    shape, affine = good.array.shape, good.affine
    rng = np.random.default_rng(1)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    ellipsoid = sum(g**2 for g in grid) < 0.6
    inputs = {
        "well registered (reference)": good.array,
        "uniform noise": rng.uniform(0, 1000, shape).astype(np.float32),
        "featureless ellipsoid": np.where(ellipsoid, 500.0, 0.0).astype(np.float32),
        "brain upside down": np.ascontiguousarray(good.array[:, :, ::-1]),
    }
    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    handler = Catch(logging.WARNING)
    logging.getLogger(reg.__name__).addHandler(handler)
    rows = []
    try:
        for name, array in inputs.items():
            warnings.clear()
            fit = reg.register(Volume(array, affine, f"{name}.nii.gz"), "mni152")
            rows.append({"input": name, **fit.quality, "warned": bool(warnings)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        logging.getLogger(reg.__name__).removeHandler(handler)
    return rows


def score_end_to_end(scan: Volume, repeats: int, work: Path) -> dict:
    """Seconds to score one 1 mm scan (load, register, score, map back), before and after."""
    from anomaly3d_core.config import load_config
    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.io.files import list_inputs, save_nifti
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    make_demo_dataset(work / "data", seed=11, n_train=6, n_test_normal=0, n_test_anomalous=0)
    overrides = [
        "tracking.enabled=false",
        "data.cache=false",
        "data.preprocessing.register_to=mni152",
        "training.num_epochs=3",
    ]
    config = load_config(HERE / "configs" / "brain_mri.yaml", overrides)
    pipe = AnomalyDetectionPipeline(config).fit(list_inputs(work / "data" / "train"), show_progress=False)
    path = str(save_nifti(np.asarray(scan.array), scan.affine, work / "scan_1mm.nii.gz"))
    out = {"scan": f"{tuple(scan.array.shape)} voxels of 1 mm, saved as .nii.gz"}
    after = reg.register

    def before(volume, target="mni152", seed=0):
        array, params = register_before(volume, reg.reference(target))
        return reg.Registration(array, params, float("nan"), float("nan"))

    for name, fn in (("after", after), ("before", before)):
        reg.register = fn
        try:
            pipe.score(path)  # warm: template and imports loaded once per process
            _, times = timed(lambda: pipe.score(path), repeats)
        finally:
            reg.register = after
        out[name] = {
            "median_seconds": round(statistics.median(times), 2),
            "all_seconds": [round(t, 2) for t in times],
        }
        print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--cases", type=int, default=3, help="scans per kind (exact, subject) and range")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the new registration")
    parser.add_argument("--repeats-before", type=int, default=1, help="of the old one (about 10 s each)")
    parser.add_argument("--quick", action="store_true", help="one scan per kind and range, no end-to-end")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.repeats = 1, 1
    load_start = os.getloadavg()
    reg.template("mni152")
    cases = make_cases(args.cases)
    rows = bench_cases(cases, args.repeats, args.repeats_before)
    result = {
        "summary": {name: summarise([r for r in rows if r["range"] == name]) for name in RANGES},
        "thresholds": {"poor_dice_below": reg.POOR_DICE, "poor_metric_above": reg.POOR_METRIC},
        "bad_inputs": bad_inputs(cases),
        "cases": rows,
    }
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            subject = next(c for c in cases if c["name"].startswith("subject-typical"))["volume"]
            result["score_one_1mm_scan"] = score_end_to_end(subject, 5, Path(tmp))
    result["machine"] = {
        "cpu_cores": os.cpu_count(),
        "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "loadavg_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"SimpleITK {sitk.Version.VersionString()}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registration.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("summary", "machine")}, indent=2))
    if "score_one_1mm_scan" in result:
        print(json.dumps(result["score_one_1mm_scan"], indent=2))


if __name__ == "__main__":
    main()
