"""Which native-scan property hurts the native preset? The same template-space test scans, re-gridded.

    python experiments/native_resolution_check.py [--data DIR] [--out DIR]

The native preset is fitted on the template-space benchmark's training normals (2 mm grid), then
each test scan is scored as it is and after an exact change of representation that leaves its
anatomy and lesion untouched: axes permuted and flipped (affine adjusted, no resampling), other
intensity units (x0.5 + 300 inside the brain), or trilinear resampling onto a 1 mm or a
1x1x2.5 mm grid (affine exact; the lesion mask goes through the same resampling). Reported per
representation: mean per-scan voxel AP over the lesioned scans, pooled voxel AP, sample AUROC and
the normals' mean volume score. Results: ``native_resolution_check.json`` and ``.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_data import make_benchmark_data  # noqa: E402
from benchmark_native import NATIVE_CONFIG, config_tree, metrics, split_files  # noqa: E402


def permuted(img: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axes (2, 0, 1), new axes 0 and 2 flipped; the affine follows, so world positions are unchanged."""
    out = np.flip(img.transpose(2, 0, 1), axis=(0, 2))
    a = affine[:, [2, 0, 1, 3]].copy()
    for axis in (0, 2):
        a[:, 3] += a[:, axis] * (out.shape[axis] - 1)
        a[:, axis] *= -1
    return np.ascontiguousarray(out), a


def regridded(img: np.ndarray, affine: np.ndarray, factors: tuple[float, ...], order: int = 1):
    """Trilinear resampling onto voxels ``factors`` times the old size (same field of view, exact affine)."""
    f = np.asarray(factors)
    shape = tuple(int(round(n / s)) for n, s in zip(img.shape, f, strict=True))
    offset = (f - 1) / 2  # new voxel j lies at old voxel coordinate f * j + (f - 1) / 2
    out = ndimage.affine_transform(img, f, offset, output_shape=shape, order=order, mode="nearest")
    step = np.eye(4)
    step[:3, :3] = np.diag(f)
    step[:3, 3] = offset
    return out.astype(np.float32), affine @ step


REPRESENTATIONS = {
    "as generated (2 mm, RAS-like)": None,
    "axes permuted + flipped": "perm",
    "intensity units x0.5 + 300": "units",
    "resampled to 1 mm": (0.5, 0.5, 0.5),
    "resampled to 1x1x2.5 mm": (0.5, 0.5, 1.25),
}


def represent(img, mask, affine, how):
    if how is None:
        return img, mask, affine
    if how == "perm":
        (pi, a), (pm, _) = permuted(img, affine), permuted(mask, affine)
        return pi, pm, a
    if how == "units":
        return np.where(img != 0, img * 0.5 + 300.0, 0.0).astype(np.float32), mask, affine
    new, a = regridded(img, affine, how)
    brain = regridded((img != 0).astype(np.float32), affine, how)[0] > 0.5
    lesion = (regridded(mask.astype(np.float32), affine, how)[0] > 0.5) & brain
    return np.where(brain, new, 0.0).astype(np.float32), lesion, a


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    data = make_benchmark_data(args.data)
    pipe = AnomalyDetectionPipeline(config_tree(NATIVE_CONFIG, {"data.cache": True}))
    pipe.fit(sorted((data / "train").glob("*.nii.gz")))
    paths, _ = split_files(data, "test")
    tmp = Path(tempfile.mkdtemp())
    acc = {name: {"truths": [], "scores": [], "vscores": []} for name in REPRESENTATIONS}
    for path in paths:
        im = nib.load(str(path))
        img, affine = np.asarray(im.get_fdata(), np.float32), im.affine
        mask = np.asarray(nib.load(str(data / "test_masks" / path.name)).dataobj) > 0
        for name, how in REPRESENTATIONS.items():
            rimg, rmask, raff = represent(img, mask, affine, how)
            file = tmp / "scan.nii.gz"
            nib.save(nib.Nifti1Image(rimg, raff), str(file))
            r = pipe.score(file)
            fg = rimg != 0
            acc[name]["truths"].append(rmask[fg])
            acc[name]["scores"].append(np.asarray(r.score_map)[fg])
            acc[name]["vscores"].append(float(r.volume_score))
        print(path.name, flush=True)
    results = []
    for name, a in acc.items():
        m = metrics(a["truths"], a["scores"], a["vscores"], full=False)
        normals = [v for v, t in zip(a["vscores"], a["truths"], strict=True) if not t.any()]
        results.append({"representation": name, **m, "normal_volume_score_mean": float(np.mean(normals))})
    head = "| representation of the same scans | per-scan AP | pooled voxel AP | sample AUROC | normals' mean volume score |"
    lines = [head, "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['representation']} | {r['per_scan_ap']:.3f} | {r['pixel_ap']:.3f} | {r['volume_auroc']:.3f} "
            f"| {r['normal_volume_score_mean']:.3f} |"
        )
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native_resolution_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "native_resolution_check.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
