"""Speed and memory of the brain presets: fit 16 volumes on a 2 mm grid, score a 128³ volume.

    python experiments/bench_speed.py [--out experiments/results]
    python experiments/bench_speed.py --batch [--config brain_mri_native.yaml] [--n-scans 12] [--rounds 3]

``--batch``: scoring a folder of template scans (demo scans on the 2 mm MNI152 grid; preset
``brain_mri_native.yaml``, or ``--config``) through the engine, seconds per scan end to end (read, preprocess, network, maps and
``scores.csv`` written), one by one (``overlap=False``: how the engine scored before) and with
reading ahead and writing behind (the engine's default), against the bare network pass
(``score_prepared``) over the same preprocessed volumes; goal: overlapped <= 1.25x the bare pass.
Each round measures the three in turn and the medians over rounds are reported, so a machine
shared with other work loads all three alike. Written to ``bench_speed_batch_<preset>.json``/``.md``.

Two rows: ``brain_mri.yaml`` with ``register_to=mni152`` (the 128³ test volume is on its own
1.5 mm grid, so it must be registered to the template space the preset scores in; registration
time is included) and ``brain_mri_native.yaml`` (no template assumption).

Scoring runs in a fresh child process so its peak RSS is the scoring's own. Figures are printed
and written to ``bench_speed.json`` and ``bench_speed.md`` in ``--out``.
Targets (2 CPU cores): scoring <= 5 s median and <= 2 GiB peak RSS; fitting <= 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RUNS = [
    (
        "brain_mri.yaml + register_to=mni152",
        HERE / "configs" / "brain_mri.yaml",
        ["data.preprocessing.register_to=mni152"],
    ),
    ("brain_mri_native.yaml", HERE / "configs" / "brain_mri_native.yaml", []),
]


def make_128_volume(path: Path, seed: int = 7) -> Path:
    """A demo subject on a 1.5 mm grid, centre-cropped/padded to exactly 128³."""
    from anomaly3d_core.demo.datasets import make_subject, mni_atlas
    from anomaly3d_core.io.files import save_nifti

    atlas = mni_atlas(1.5)
    image, _ = make_subject(atlas, np.random.default_rng(seed), "tumour", voxel_size=1.5)
    out = np.zeros((128, 128, 128), np.float32)
    src, dst = [], []
    for n in image.shape:
        if n >= 128:
            a = (n - 128) // 2
            src.append(slice(a, a + 128))
            dst.append(slice(0, 128))
        else:
            a = (128 - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = image[tuple(src)]
    affine = atlas.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([s.start - d.start for s, d in zip(src, dst, strict=True)])
    return save_nifti(out, affine, path)


def child_score(model: str, volume: str, repeats: int) -> None:
    from anomaly3d_core.persistence import load_detector

    pipe = load_detector(model)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.score(volume)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"times": times, "peak_rss_mib": peak}))


def measure(
    name: str,
    config_path: Path,
    overrides: list[str],
    train: list[Path],
    vol128: Path,
    work: Path,
    repeats: int,
) -> dict:
    from anomaly3d_core.config import load_config
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    config = load_config(config_path, ["tracking.enabled=false", "data.cache=false", *overrides])
    pipe = AnomalyDetectionPipeline(config)
    t0 = time.perf_counter()
    pipe.fit(train, show_progress=False)
    fit_s = time.perf_counter() - t0
    model = pipe.save(work / f"model-{len(name)}-{abs(hash(name)) % 10000}")
    child = subprocess.run(
        [sys.executable, __file__, "--child-score", str(model), str(vol128), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    scored = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "name": name,
        "fit_volumes": len(train),
        "fit_seconds": round(fit_s, 1),
        "epochs": len(pipe.history_["train_loss"]),
        "score_128_median_seconds": round(statistics.median(scored["times"]), 3),
        "score_128_all_seconds": [round(t, 3) for t in scored["times"]],
        "score_peak_rss_mib": round(scored["peak_rss_mib"], 1),
    }
    targets = {"score_128_median_seconds": 5.0, "score_peak_rss_mib": 2048, "fit_seconds": 600}
    result["meets_targets"] = {k: result[k] <= v for k, v in targets.items()}
    return result


def measure_batch(preset: str, n_train: int, n_scans: int, rounds: int, work: Path) -> dict:
    """Seconds per template scan scored through the engine, against the bare network pass (see the module docstring)."""
    from anomaly3d_core.config import load_config
    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.engine import Engine
    from anomaly3d_core.io.files import list_inputs
    from anomaly3d_core.persistence import build_detector
    from anomaly3d_core.runner import score_files

    n_anomalous = n_scans // 2
    data = make_demo_dataset(
        work / "batch",
        seed=5,
        n_train=n_train,
        n_test_normal=n_scans - n_anomalous,
        n_test_anomalous=n_anomalous,
    )
    config = load_config(
        HERE / "configs" / preset,
        ["tracking.enabled=false", "data.cache=false", "training.num_epochs=3"],
    )
    engine = Engine()
    pipe = engine.fit(build_detector(config), list_inputs(data / "train"), show_progress=False).detector
    scans = list_inputs(data / "test")
    prepared = [pipe.prepare(pipe.read(s)) for s in scans]
    pipe.score_prepared(prepared[0])  # warm-up
    bare, one_by_one, overlapped = [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        for prep in prepared:
            pipe.score_prepared(prep)
        bare.append((time.perf_counter() - t0) / len(scans))
        t0 = time.perf_counter()
        score_files(pipe, scans, work / f"one-by-one-{r}", overlap=False)
        one_by_one.append((time.perf_counter() - t0) / len(scans))
        t0 = time.perf_counter()
        engine.score(pipe, scans, work / f"overlapped-{r}")
        overlapped.append((time.perf_counter() - t0) / len(scans))
    out = {
        "preset": preset,
        "scans": len(scans),
        "grid": list(prepared[0].array.shape[:3]),
        "rounds": rounds,
        "bare_network_s": round(statistics.median(bare), 4),
        "one_by_one_s": round(statistics.median(one_by_one), 4),
        "overlapped_s": round(statistics.median(overlapped), 4),
        "all_rounds": {"bare": bare, "one_by_one": one_by_one, "overlapped": overlapped},
        "load_average": list(os.getloadavg()),
    }
    out["one_by_one_ratio"] = round(out["one_by_one_s"] / out["bare_network_s"], 2)
    out["overlapped_ratio"] = round(out["overlapped_s"] / out["bare_network_s"], 2)
    out["meets_target"] = out["overlapped_ratio"] <= 1.25
    return out


def write_batch(result: dict, out: Path) -> None:
    machine = (
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}; "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads; load average "
        + ", ".join(f"{x:.1f}" for x in result["load_average"])
    )
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_speed_batch_" + result["preset"].removesuffix(".yaml")
    (out / f"{stem}.json").write_text(json.dumps({**result, "machine": machine}, indent=2) + "\n")
    lines = [
        f"| {result['preset']}: scoring {result['scans']} template scans (working grid {'x'.join(map(str, result['grid']))}) | s per scan | x bare pass |",
        "|---|---|---|",
        f"| bare network pass (score_prepared) | {result['bare_network_s']} | 1.00 |",
        f"| engine, one by one | {result['one_by_one_s']} | {result['one_by_one_ratio']} |",
        f"| engine, overlapped (default) | {result['overlapped_s']} | {result['overlapped_ratio']} |",
        "",
        f"Medians of {result['rounds']} rounds; {machine}.",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child-score", nargs=2, metavar=("MODEL", "VOLUME"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--batch", action="store_true", help="seconds per scan of a folder scored by the engine"
    )
    parser.add_argument(
        "--config", default="brain_mri_native.yaml", help="--batch: preset in experiments/configs"
    )
    parser.add_argument("--n-scans", type=int, default=12, help="--batch: template scans to score")
    parser.add_argument("--rounds", type=int, default=3, help="--batch: rounds of the three measurements")
    args = parser.parse_args()
    if args.child_score:
        child_score(*args.child_score, args.repeats)
        return
    if args.batch:
        with tempfile.TemporaryDirectory() as tmp:
            found = measure_batch(args.config, min(args.n_train, 8), args.n_scans, args.rounds, Path(tmp))
            write_batch(found, args.out)
        return
    from anomaly3d_core.demo.datasets import make_demo_dataset
    from anomaly3d_core.io.files import list_inputs

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_demo_dataset(work / "data", seed=11, n_train=args.n_train, n_test_normal=0, n_test_anomalous=0)
        vol128 = make_128_volume(work / "vol128.nii.gz")
        train = list_inputs(work / "data" / "train")
        rows = [
            measure(name, path, overrides, train, vol128, work, args.repeats)
            for name, path, overrides in RUNS
        ]
    machine = {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "targets": {"score_128_median_seconds": 5.0, "score_peak_rss_mib": 2048, "fit_seconds": 600},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_speed.json").write_text(json.dumps({"runs": rows, **machine}, indent=2) + "\n")
    lines = [
        f"| configuration | fit {args.n_train} volumes (2 mm grid) | score one 128³ volume (median of {args.repeats}) | peak RSS while scoring |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['fit_seconds']} s ({r['epochs']} epochs) | {r['score_128_median_seconds']} s | {r['score_peak_rss_mib']} MiB |"
        )
    lines += [
        "| target | <= 600 s | <= 5 s | <= 2048 MiB |",
        "",
        f"{machine['machine']}; {machine['cpu_cores']} CPU cores, {machine['torch_threads']} torch threads, device {machine['device']}.",
    ]
    (args.out / "bench_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
