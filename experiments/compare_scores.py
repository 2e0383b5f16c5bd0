"""Compare two runs of experiments/bit_identity.sh: every score map and mask (max |diff|), the
volume scores of scores.csv and the fitted weights, for each set both runs have (tpl, nat, ms).

    python experiments/compare_scores.py BEFORE_DIR AFTER_DIR
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def main(before: Path, after: Path) -> float:
    worst, n = 0.0, 0
    for kind in ("tpl", "nat", "ms"):
        if not all((d / f"{kind}_scores").is_dir() for d in (before, after)):
            continue
        root = before / f"{kind}_scores"
        for f in sorted(root.rglob("*.nii.gz")):  # several sequences: a BIDS-Derivatives tree
            x = np.asarray(nib.load(f).dataobj, dtype=np.float64)
            y = np.asarray(nib.load(after / f"{kind}_scores" / f.relative_to(root)).dataobj, dtype=np.float64)
            worst = max(worst, float(np.max(np.abs(x - y))) if x.shape == y.shape else float("inf"))
            n += 1
        rows = [
            {
                r["score_map"]: r["volume_score"]
                for r in csv.DictReader(open(d / f"{kind}_scores" / "scores.csv"))
            }
            for d in (before, after)
        ]
        weights = [
            torch.load(next((d / f"{kind}_model").rglob("weights.pt")), weights_only=True)
            for d in (before, after)
        ]
        same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        print(
            f"{kind}: {len(rows[0])} volume scores identical: {rows[0] == rows[1]}; weights identical: {same}"
        )
    print(f"{n} maps compared, max |diff| = {worst}")
    return worst


if __name__ == "__main__":
    sys.exit(0 if main(Path(sys.argv[1]), Path(sys.argv[2])) == 0 else 1)
