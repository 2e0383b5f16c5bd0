"""The demo benchmark data, with fixed seeds: train normals, a tuning set, and a test set.

Lesion kinds ``tumour`` and ``infarct`` are used for tuning; ``ms`` and ``haemorrhage`` are held
out of tuning and reported separately.

The native-space set (``make_benchmark_data(root / "native", space="native")``, or
``python experiments/bench_data.py OUT --native``) has the same structure, with scans as a
multi-site study acquires them: each with its own head pose, voxel size (1-2 mm, some thick-slice),
axis order, field of view and intensity units (``anomaly3d_core.demo.native``).

The multi-sequence sets (``make_benchmark_data(root / "multiseq", sequences=("T1w", "T2w", "FLAIR"))``,
or ``python experiments/bench_data.py OUT --sequences T1w,T2w,FLAIR [--native]``, by convention
under ``<data>/multiseq`` and ``<data>/multiseq_native``) have the same structure, with ``train``,
``tune`` and ``test`` written as BIDS raw datasets, one file per sequence
(``anomaly3d_core.demo.multiseq``); masks lie on each subject's T1w grid. A sequence's images do not
depend on which other sequences are written, so ``T1w`` alone and ``T1w,FLAIR`` share subjects.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from anomaly3d_core.demo.datasets import make_demo_dataset
from anomaly3d_core.demo.multiseq import make_multiseq_dataset

TUNING_KINDS = ("tumour", "infarct")
HELD_OUT_KINDS = ("ms", "haemorrhage")
#: the native-space set's seeds are offset so that it shares no subject with the template-space set
SEED_OFFSET = {"template": 0, "native": 1000}


def make_benchmark_data(
    root: Path,
    n_train: int = 16,
    n_test_normal: int = 8,
    n_test_anomalous: int = 16,
    space: str = "template",
    sequences: tuple[str, ...] | None = None,
) -> Path:
    """``root/train``; ``root/tune`` + ``tune_masks``; ``root/test`` + ``test_masks`` + ``test_manifest.csv``.

    ``space="native"`` writes the native-space set (by convention under ``<data>/native``);
    ``sequences`` the multi-sequence BIDS set (by convention under ``<data>/multiseq[_native]``).
    """
    if (root / "test_manifest.csv").is_file():
        return root
    off = SEED_OFFSET[space]
    sets = {
        "train": dict(seed=100 + off, n_train=n_train, n_test_normal=0, n_test_anomalous=0),
        "tune": dict(
            seed=200 + off, n_train=0, n_test_normal=2, n_test_anomalous=6, lesion_kinds=TUNING_KINDS
        ),
        "test": dict(
            seed=300 + off, n_train=0, n_test_normal=n_test_normal, n_test_anomalous=n_test_anomalous
        ),
    }
    for name, kwargs in sets.items():
        tmp = root / f".{name}"
        if tmp.exists():  # left over from an interrupted run
            shutil.rmtree(tmp)
        if sequences:
            make_multiseq_dataset(tmp, space=space, sequences=sequences, test_split=name, **kwargs)
        else:
            make_demo_dataset(tmp, space=space, **kwargs)
        split = name if sequences else "test"
        if name == "train":
            shutil.move(tmp / "train", root / "train")
        else:
            shutil.move(tmp / split, root / name)
            shutil.move(tmp / f"{split}_masks", root / f"{name}_masks")
            shutil.move(tmp / "manifest.csv", root / f"{name}_manifest.csv")
        shutil.rmtree(tmp)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--native", action="store_true", help="write the native-space set into OUT")
    parser.add_argument(
        "--sequences", help="comma-separated, e.g. T1w,T2w,FLAIR: the multi-sequence set, as BIDS, into OUT"
    )
    args = parser.parse_args()
    sequences = tuple(s.strip() for s in args.sequences.split(",")) if args.sequences else None
    print(make_benchmark_data(args.out, space="native" if args.native else "template", sequences=sequences))
