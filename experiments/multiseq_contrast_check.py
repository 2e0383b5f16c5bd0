"""How visible each lesion kind is in T1w, T2w and FLAIR of the multi-sequence demo data.

For template-space subjects (2 mm, the benchmark's grid) it measures, per sequence, the
contrast-to-noise ratio of the lesion against normal white matter of the same scan,
``(mean lesion - mean WM) / sd WM`` (WM: tissue probability > 0.9, away from the lesion; its sd
holds noise, bias field and texture), and the relative contrast ``mean lesion / mean WM - 1``;
for the whole lesion (the ground truth) and for each part of a lesion with several. Writes
``experiments/results/multiseq_contrast.json``.

    python experiments/multiseq_contrast_check.py [--subjects 6]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from anomaly3d_core.demo.anatomy import LESION_KINDS, mni_atlas
from anomaly3d_core.demo.contrasts import SEQUENCES
from anomaly3d_core.demo.multiseq import make_multiseq_subject

RESULTS = Path(__file__).parent / "results" / "multiseq_contrast.json"
SEED = 4242


def contrast(image: np.ndarray, region: np.ndarray, wm: np.ndarray) -> tuple[float, float]:
    """CNR and relative contrast of ``region`` against the white-matter voxels ``wm``."""
    ref, sd = float(image[wm].mean()), float(image[wm].std())
    mean = float(image[region].mean())
    return (mean - ref) / sd, mean / ref - 1.0


def measure(n_subjects: int, voxel_size: float = 2.0) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{kind: {part: {sequence: {"cnr", "contrast"}}}}``, means over ``n_subjects`` per kind."""
    atlas = mni_atlas(voxel_size)
    sums: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for k, kind in enumerate(LESION_KINDS):
        for i in range(n_subjects):
            subject = make_multiseq_subject(atlas, (SEED, k, i), kind, SEQUENCES, voxel_size, "template")
            away = ~ndimage.binary_dilation(subject.mask, iterations=3)
            wm = (subject.tissues.wm > 0.9) & subject.tissues.brain & away
            regions = {"lesion": subject.mask}
            if len(subject.parts) > 1:
                regions.update({p: m for p, m in subject.parts.items() if m.any()})
            for part, region in regions.items():
                for sequence, scan in subject.scans.items():
                    acc = sums.setdefault(kind, {}).setdefault(part, {}).setdefault(sequence, np.zeros(3))
                    acc += (*contrast(scan.image, region, wm), 1.0)
    return {
        kind: {
            part: {
                s: {"cnr": round(a[0] / a[2], 2), "contrast": round(a[1] / a[2], 3)} for s, a in seqs.items()
            }
            for part, seqs in parts.items()
        }
        for kind, parts in sums.items()
    }


def table(results: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
    head = "| lesion kind | region | " + " | ".join(f"{s} CNR (contrast)" for s in SEQUENCES) + " |"
    lines = [head, "|" + "---|" * (2 + len(SEQUENCES))]
    for kind, parts in results.items():
        for part, seqs in parts.items():
            cells = [f"{seqs[s]['cnr']:+.1f} ({seqs[s]['contrast']:+.0%})" for s in SEQUENCES]
            lines.append(f"| {kind} | {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=6, help="subjects per lesion kind (default 6)")
    args = parser.parse_args()
    results = measure(args.subjects)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"subjects_per_kind": args.subjects, "seed": SEED, "results": results}, indent=2) + "\n"
    )
    print(table(results))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
