"""The guarantees of the calibrated verdicts, measured on native-space data (issue 23).

    python experiments/bench_calibration.py [--data DIR] [--out DIR] [--n-calibration N] [--quick]

Data (fixed seeds, ``anomaly3d_core.demo.native``; default DIR ``bench_output/data/calibration``):
16 training normals, a separate set of calibration normals (40) and a test set of 40 held-out
normals and 24 lesioned subjects (tumour, infarct, ms, haemorrhage). Healthy-only: no lesioned scan
is used to fit or to calibrate; the preset is ``brain_mri_native.yaml`` unchanged.

One fit (train normals; calibrated on the calibration normals through ``fit(val_volumes=...)``),
then every test scan is scored once and every rule is read from the same scores:

- scan level: the fraction of held-out normals flagged at alpha = 0.05 (Clopper–Pearson 95 %
  interval), the fraction of lesioned scans flagged, and the scan AUROC of the p-value (both scan
  statistics) against today's top-k-mean volume score;
- voxel level: empirical FDR of the Benjamini–Hochberg mask at q = 0.1 on lesioned scans, and
  false-positive clusters (clusters touching no lesion) per normal and per lesioned scan for each
  mask rule (cluster, fdr, threshold);
- lesion-wise sensitivity of the cluster mask by lesion size (< 0.5 cm³, 0.5–5, > 5 cm³).

Results: ``bench_calibration.json`` and ``bench_calibration.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SEED_OFFSET = 3000  # no subject shared with the other benchmark sets
NATIVE_CONFIG = HERE / "configs" / "brain_mri_native.yaml"
RULES = ("cluster", "fdr", "threshold")


def make_calibration_data(
    root: Path, n_calibration: int = 40, n_normal: int = 40, n_lesioned: int = 24
) -> Path:
    """``root/train`` (16 normals), ``root/calibration`` (normals), ``root/test`` + masks + manifest."""
    from anomaly3d_core.demo.datasets import make_demo_dataset

    if (root / "test_manifest.csv").is_file():
        return root
    sets = {
        "train": dict(seed=100 + SEED_OFFSET, n_train=16, n_test_normal=0, n_test_anomalous=0),
        "calibration": dict(
            seed=400 + SEED_OFFSET, n_train=0, n_test_normal=n_calibration, n_test_anomalous=0
        ),
        "test": dict(seed=500 + SEED_OFFSET, n_train=0, n_test_normal=n_normal, n_test_anomalous=n_lesioned),
    }
    for name, kwargs in sets.items():
        tmp = root / f".{name}"
        if tmp.exists():  # left over from an interrupted run
            shutil.rmtree(tmp)
        make_demo_dataset(tmp, space="native", **kwargs)
        shutil.move(tmp / ("train" if name == "train" else "test"), root / name)
        if name == "test":
            shutil.move(tmp / "test_masks", root / "test_masks")
            shutil.move(tmp / "manifest.csv", root / "test_manifest.csv")
        shutil.rmtree(tmp)
    return root


def scans(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.nii.gz"))


def fit_and_calibrate(data: Path, n_calibration: int) -> tuple[Any, dict[str, Any]]:
    """Fit on the training normals (the pipeline's own split picks the epoch), then calibrate on
    ``n_calibration`` separate normals that the model never saw; returns the model and fit facts."""
    from benchmark_native import config_tree

    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    t0 = time.perf_counter()
    pipe = AnomalyDetectionPipeline(config_tree(NATIVE_CONFIG)).fit(
        scans(data / "train"), show_progress=False
    )
    fit_s = time.perf_counter() - t0
    legacy = {  # today's decision: volume threshold from the pipeline's own few validation scans
        "n_val_scans": pipe.n_val_volumes_,
        "volume_threshold": pipe.postprocessor_.volume_threshold_,
    }
    t0 = time.perf_counter()
    pipe.calibrate(scans(data / "calibration")[:n_calibration])
    return pipe, {
        "fit_seconds": round(fit_s, 1),
        "calibration_seconds": round(time.perf_counter() - t0, 1),
        "n_train": pipe.n_train_volumes_,
        "n_calibration": pipe.postprocessor_.n_calibration,
        "legacy": legacy,
    }


def score_test(pipe: Any, data: Path) -> list[dict[str, Any]]:
    """Every test scan scored once; each mask rule and scan statistic read from the same scores."""
    import nibabel as nib

    from anomaly3d_core.postprocess.calibration import conformal_p, top_k_mean
    from anomaly3d_core.postprocess.native import mask_to_native
    from anomaly3d_core.postprocess.postprocessor import depth_band
    from anomaly3d_core.postprocess.verdict import calibrated_verdict

    post = pipe.postprocessor_
    null = post.null_
    out = []
    for path in scans(data / "test"):
        t0 = time.perf_counter()
        r = pipe.score(path)
        seconds = time.perf_counter() - t0
        prep = r.prepared
        truth = np.asarray(nib.load(str(data / "test_masks" / path.name)).dataobj) > 0
        top_k = top_k_mean(r.prepared_scores, prep.mask, post.config.volume.top_k_fraction)
        bands = depth_band(prep.mask, prep.spacing)
        masks = {}
        for rule in RULES:
            cfg = post.config.model_copy(update={"mask_rule": rule})
            v = calibrated_verdict(
                null,
                cfg,
                r.prepared_scores,
                prep.mask,
                bands,
                prep.spacing,
                post.threshold_,
                post.decide(r.prepared_scores, prep.mask, prep.spacing)[1],
            )
            masks[rule] = mask_to_native(v.mask, prep) & r.foreground
        assert np.array_equal(masks[post.config.mask_rule], r.mask)
        out.append(
            {
                "name": path.name,
                "truth": truth,
                "masks": masks,
                "voxel_mm3": float(abs(np.linalg.det(r.volume.affine[:3, :3]))),
                "p_cluster": r.p_value,
                "p_top_k": conformal_p(top_k, null.null_stats_["top_k_mean"]),
                "top_k": top_k,
                "seconds": seconds,
            }
        )
    return out


def summarise(rows: list[dict[str, Any]], alpha: float, legacy_threshold: float) -> dict[str, Any]:
    from anomaly3d_core.evaluation.guarantees import guarantee_metrics

    truths = [r["truth"] for r in rows]
    mm3 = [r["voxel_mm3"] for r in rows]
    top_k = [r["top_k"] for r in rows]
    scan = {}
    for name, key in (
        ("p-value of the largest cluster mass (default)", "p_cluster"),
        ("p-value of the top-k mean", "p_top_k"),
    ):
        p = [r[key] for r in rows]
        scan[name] = guarantee_metrics(
            truths, [r["masks"]["cluster"] for r in rows], [x <= alpha for x in p], p, top_k, mm3, alpha
        )
    today = [t > legacy_threshold for t in top_k]
    scan["today: top-k mean > volume threshold (pipeline's own validation scans)"] = guarantee_metrics(
        truths, [r["masks"]["threshold"] for r in rows], today, [-t for t in top_k], top_k, mm3, alpha
    )
    decided = [r["p_cluster"] <= alpha for r in rows]
    p = [r["p_cluster"] for r in rows]
    masks = {
        rule: guarantee_metrics(truths, [r["masks"][rule] for r in rows], decided, p, top_k, mm3, alpha)
        for rule in RULES
    }
    return {"scan": scan, "masks": masks}


def table(result: dict[str, Any]) -> str:
    f = result["facts"]
    lines = [
        f"Native benchmark, healthy-only: {f['n_train']} training normals (+ {f['legacy']['n_val_scans']} of their own "
        f"for validation), {f['n_calibration']} separate calibration normals, test {result['n_normal']} normals + "
        f"{result['n_lesioned']} lesioned; alpha {result['alpha']}, q {result['fdr_q']}; fit {f['fit_seconds']} s, "
        f"calibration {f['calibration_seconds']} s, {result['seconds_per_scan']:.2f} s per test scan.",
        "",
        "| scan decision | normals flagged (95 % CI) | lesioned flagged | scan AUROC (top-k mean: "
        f"{next(iter(result['scan'].values()))['scan_auroc_top_k_mean']:.3f}) |",
        "|---|---|---|---|",
    ]
    for name, m in result["scan"].items():
        lo, hi = m["normal_flagged_fraction_ci"]
        lines.append(
            f"| {name} | {m['normal_flagged_fraction']:.3f} [{lo:.3f}, {hi:.3f}] | {m['lesioned_flagged_fraction']:.3f} "
            f"| {m['scan_auroc_p_value']:.3f} |"
        )
    lines += [
        "",
        "| mask rule | voxel FDR (lesioned) | FP clusters / normal scan | normals with an FP cluster "
        "| FP clusters / lesioned scan | lesions found < 0.5 cm³ | 0.5-5 cm³ | > 5 cm³ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rule, m in result["masks"].items():
        sens = [
            f"{m[f'lesion_sensitivity_{b}_cm3']:.2f} ({m[f'n_lesions_{b}_cm3']})"
            for b in ("lt0.5", "0.5to5", "gt5")
        ]
        lines.append(
            f"| {rule} | {m['voxel_fdr_lesioned']:.3f} | {m['fp_clusters_per_normal_scan']:.3f} "
            f"| {m['normal_scans_with_fp_cluster']:.3f} | {m['fp_clusters_per_lesioned_scan']:.2f} | "
            + " | ".join(sens)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/calibration"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--n-calibration", type=int, default=40, help="calibration normals used (of 40)")
    args = parser.parse_args()
    print(f"calibration benchmark data in {make_calibration_data(args.data)}", flush=True)
    pipe, facts = fit_and_calibrate(args.data, args.n_calibration)
    print(f"fitted in {facts['fit_seconds']} s, calibrated on {facts['n_calibration']} normals", flush=True)
    rows = score_test(pipe, args.data)
    cfg = pipe.postprocessor_.config
    result = {
        "alpha": cfg.alpha,
        "fdr_q": cfg.fdr_q,
        "cluster_forming_p": cfg.cluster_forming_p,
        "facts": facts,
        "n_normal": sum(not r["truth"].any() for r in rows),
        "n_lesioned": sum(bool(r["truth"].any()) for r in rows),
        "seconds_per_scan": float(np.median([r["seconds"] for r in rows])),
        **summarise(rows, cfg.alpha, facts["legacy"]["volume_threshold"]),
    }
    result["per_scan"] = [
        {k: r[k] for k in ("name", "p_cluster", "p_top_k", "top_k")} | {"lesioned": bool(r["truth"].any())}
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_calibration.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = table(result)
    (args.out / "bench_calibration.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    if "--data-only" in sys.argv:
        print(make_calibration_data(Path(sys.argv[sys.argv.index("--data-only") + 1])))
    else:
        main()
