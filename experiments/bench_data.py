"""The demo benchmark data, with fixed seeds: train normals, a tuning set, and a test set.

Lesion kinds ``tumour`` and ``infarct`` are used for tuning; ``ms`` and ``haemorrhage`` are held
out of tuning and reported separately.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from anomaly3d_core.demo.datasets import make_demo_dataset

TUNING_KINDS = ("tumour", "infarct")
HELD_OUT_KINDS = ("ms", "haemorrhage")


def make_benchmark_data(
    root: Path, n_train: int = 16, n_test_normal: int = 8, n_test_anomalous: int = 16
) -> Path:
    """``root/train``; ``root/tune`` + ``tune_masks``; ``root/test`` + ``test_masks`` + ``test_manifest.csv``."""
    if (root / "test_manifest.csv").is_file():
        return root
    sets = {
        "train": dict(seed=100, n_train=n_train, n_test_normal=0, n_test_anomalous=0),
        "tune": dict(seed=200, n_train=0, n_test_normal=2, n_test_anomalous=6, lesion_kinds=TUNING_KINDS),
        "test": dict(seed=300, n_train=0, n_test_normal=n_test_normal, n_test_anomalous=n_test_anomalous),
    }
    for name, kwargs in sets.items():
        tmp = root / f".{name}"
        make_demo_dataset(tmp, **kwargs)
        if name == "train":
            shutil.move(tmp / "train", root / "train")
        else:
            shutil.move(tmp / "test", root / name)
            shutil.move(tmp / "test_masks", root / f"{name}_masks")
            shutil.move(tmp / "manifest.csv", root / f"{name}_manifest.csv")
        shutil.rmtree(tmp)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(make_benchmark_data(args.out))
