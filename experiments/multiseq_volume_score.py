"""Why the sample AUROC of T1w + FLAIR stays below 0.98: the volume score's top-k fraction.

    python experiments/multiseq_volume_score.py [--data DIR] [--out DIR]

Fits ``brain_mri.yaml`` with ``data.sequences: [T1w, FLAIR]`` on the template-space multi-sequence
benchmark's training normals and recomputes each subject's volume score (mean of the top
``top_k_fraction`` of voxel scores in the brain) for several fractions, on the tuning set (the only
split a choice may use) and on the test set (shown for diagnosis; nothing is chosen from it).
Writes ``multiseq_volume_score.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_data import make_benchmark_data  # noqa: E402
from benchmark_multiseq import PRESETS, SEQUENCES  # noqa: E402
from benchmark_native import config_tree  # noqa: E402

FRACTIONS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


def main() -> None:
    from sklearn.metrics import roc_auc_score

    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline
    from anomaly3d_core.postprocess.thresholding import volume_score

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/multiseq"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    data = make_benchmark_data(args.data, sequences=SEQUENCES)
    tree = config_tree(PRESETS["brain_mri.yaml"], {"data.sequences": ["T1w", "FLAIR"]})
    pipe = AnomalyDetectionPipeline(tree).fit(
        list_items(data / "train", ["T1w", "FLAIR"]).items, show_progress=False
    )
    report: dict = {}
    for split in ("tune", "test"):
        kinds = {r["subject"]: r["lesion_kind"] for r in csv.DictReader(open(data / f"{split}_manifest.csv"))}
        subjects = []
        for subject in list_items(data / split, pipe.channels).items:
            r = pipe.score(subject)
            scores = {str(f): volume_score(r.prepared_scores, r.prepared.mask, f) for f in FRACTIONS}
            subjects.append(
                {"subject": subject.stem, "kind": kinds.get(subject.stem, ""), "volume_scores": scores}
            )
        labels = [int(bool(s["kind"])) for s in subjects]
        auroc = {
            str(f): roc_auc_score(labels, [s["volume_scores"][str(f)] for s in subjects]) for f in FRACTIONS
        }
        report[split] = {"sample_auroc": auroc, "subjects": subjects}
        print(split, " ".join(f"{f}: {a:.3f}" for f, a in auroc.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multiseq_volume_score.json").write_text(json.dumps(report, indent=2) + "\n")
    test = sorted(report["test"]["subjects"], key=lambda s: s["volume_scores"]["0.01"])
    print("test subjects by volume score (top 1 %):")
    for s in test:
        print(f"  {s['subject']} {s['kind'] or 'normal':<12} {s['volume_scores']['0.01']:.2f}")


if __name__ == "__main__":
    main()
