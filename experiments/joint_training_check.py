"""Measures the third option for default extractor weights: training the CNN extractor jointly
with the patch autoencoder on the autoencoder's own loss.

    python experiments/joint_training_check.py [--data bench_output/data] [--epochs 10]

The extractor (``simple``, layers 1-2, avg-pooled patches) and the autoencoder are trained
together on random 32³ crops of the preprocessed training normals; the script prints, per epoch,
the loss and the spread (std) of the extractor's features, then the pooled voxel AP on the
benchmark test set. Written to ``joint_training.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_data import make_benchmark_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("bench_output/data"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    from anomaly3d_core.config import build_config
    from anomaly3d_core.io.files import list_inputs, load_volume
    from anomaly3d_core.pipeline import AnomalyDetectionPipeline

    data = make_benchmark_data(args.data)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = build_config(
        {
            "extractor": {"type": "simple", "layers": ["layer1", "layer2"]},
            "embedding": {"embedding_method": "avg"},
            "patches": {"patch_size": 8, "stride": 4, "score_mode": "patch"},
            "tracking": {"enabled": False},
        }
    )
    pipe = AnomalyDetectionPipeline(cfg)
    net = pipe.model_ = pipe.build_network()
    arrays = [pipe.prepare(p).array for p in list_inputs(data / "train")]
    net.extractor.requires_grad_(True).train()
    opt = torch.optim.Adam([*net.extractor.parameters(), *net.autoencoder.parameters()], lr=1e-3)
    history = []
    for epoch in range(args.epochs):
        losses, spreads = [], []
        for _ in range(20):
            a = arrays[rng.integers(len(arrays))]
            st = [rng.integers(0, max(1, s - 32 + 1)) for s in a.shape]
            crop = torch.from_numpy(
                np.ascontiguousarray(a[st[0] : st[0] + 32, st[1] : st[1] + 32, st[2] : st[2] + 32])
            )[None, None]
            feat = net.features(crop)
            view, grid = net.grid_patches(feat)
            vectors = net.embedding.raw(
                view.reshape(-1, *view.shape[3:])
            )  # no standardisation: it would hide the collapse
            out = net.autoencoder(vectors)
            loss, _ = net.autoencoder.loss(vectors, out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            spreads.append(float(feat.detach().std()))
        history.append(
            {"epoch": epoch + 1, "loss": float(np.mean(losses)), "feature_std": float(np.mean(spreads))}
        )
        print(history[-1], flush=True)
    net.extractor.requires_grad_(False).eval()
    net.autoencoder.eval()
    raw, centres = pipe._collect(
        [pipe.prepare(p) for p in list_inputs(data / "train")[:8]], torch.Generator().manual_seed(0)
    )
    net.embedding.fit_standardization(raw)
    pipe.threshold_ = 0.0
    truths, scores = [], []
    for path in list_inputs(data / "test"):
        prep = pipe.prepare(path)
        s = pipe.score_prepared(prep)
        gt = pipe.prepare(
            path, load_volume(data / "test_masks" / path.name, allow_constant=True).array > 0
        ).target
        truths.append(gt[prep.mask])
        scores.append(s[prep.mask])
    ap = float(average_precision_score(np.concatenate(truths), np.concatenate(scores)))
    result = {
        "history": history,
        "voxel_ap": ap,
        "note": "simple CNN + avg patches + standard AE, trained jointly",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "joint_training.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"voxel AP after joint training: {ap:.3f} (feature std {history[0]['feature_std']:.3g} -> {history[-1]['feature_std']:.3g})"
    )


if __name__ == "__main__":
    main()
