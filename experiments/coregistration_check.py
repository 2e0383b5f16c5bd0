"""How well a subject's FLAIR lands on its T1w grid, with and without rigid co-registration.

    python experiments/coregistration_check.py [--data DIR] [--out DIR]

On the native-space multi-sequence benchmark's test subjects (every FLAIR on its own thick-slice
grid, the head moved 1-3° and 1-3 mm between sequences), each FLAIR is put on the T1w grid by the
scanner's alignment alone and after co-registration (``preprocess/sequences.py``). Reported per
subject: the Dice overlap of the FLAIR's brain (above 20 % of its median) with the T1w brain, the
lesion's FLAIR intensity relative to the brain median (higher when the lesion lines up), and the
seconds each takes. Writes ``coregistration_check.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_data import make_benchmark_data  # noqa: E402
from benchmark_multiseq import SEQUENCES  # noqa: E402


def main() -> None:
    from anomaly3d_core.io.data import list_items
    from anomaly3d_core.io.files import load_volume
    from anomaly3d_core.preprocess.sequences import onto_reference

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data/multiseq_native"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    data = make_benchmark_data(args.data, space="native", sequences=SEQUENCES)
    rows = []
    for subject in list_items(data / "test", ["T1w", "FLAIR"]).items:
        t1, flair = load_volume(subject.files["T1w"]), load_volume(subject.files["FLAIR"])
        lesion = load_volume(data / "test_masks" / f"{subject.stem}.nii.gz", allow_constant=True).array > 0
        brain = t1.array > 0
        row: dict = {"subject": subject.stem}
        for name, coregister in (("scanner", False), ("coregistered", True)):
            t0 = time.perf_counter()
            array, info = onto_reference(flair, t1, coregister, subject.stem, "FLAIR")
            seconds = time.perf_counter() - t0
            fg = array > 0.2 * np.median(array[array > 0])
            row[name] = {
                "brain_dice": round(float(2 * (fg & brain).sum() / (fg.sum() + brain.sum())), 4),
                "lesion_contrast": round(float(array[lesion].mean() / np.median(array[brain])), 3)
                if lesion.any()
                else None,
                "seconds": round(seconds, 3),
                **info,
            }
        rows.append(row)
        print(subject.stem, row["scanner"]["brain_dice"], "->", row["coregistered"]["brain_dice"], flush=True)
    summary = {
        name: {
            "brain_dice_mean": round(float(np.mean([r[name]["brain_dice"] for r in rows])), 4),
            "lesion_contrast_mean": round(
                float(
                    np.mean(
                        [r[name]["lesion_contrast"] for r in rows if r[name]["lesion_contrast"] is not None]
                    )
                ),
                3,
            ),
            "seconds_median": round(float(np.median([r[name]["seconds"] for r in rows])), 3),
        }
        for name in ("scanner", "coregistered")
    }
    print(json.dumps(summary, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coregistration_check.json").write_text(
        json.dumps({"summary": summary, "subjects": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
