"""Run by tests/test_synthetic_detector.py under torchrun: trains one small U-Net on synthetic anomalies."""

import sys
from pathlib import Path

import numpy as np
import torch

from anomaly3d_core.model import distributed
from anomaly3d_core.model.corruption import CorruptionSpec
from anomaly3d_core.model.segmentation import LoopSettings, train_segmenter
from anomaly3d_plugins.segmenters.unet import UNet

distributed.init_from_env()
torch.set_num_threads(1)
out = Path(sys.argv[1])
torch.manual_seed(100 + distributed.rank())  # different local init: DDP must broadcast rank 0's
rng = np.random.default_rng(0)
arrays = [rng.standard_normal((24, 24, 24)).astype(np.float32) for _ in range(3)]
fg = np.zeros((24, 24, 24), bool)
fg[3:-3, 3:-3, 3:-3] = True
net = UNet(1, {"channels": [4, 8], "norm": "none"})
settings = LoopSettings(6, 16, 2, 1e-3, 0.0, 1.0, 3, 0.0, False, 0)
history = train_segmenter(net, arrays, [fg] * 3, CorruptionSpec(), settings, torch.device("cpu"))
torch.save({"state": net.state_dict(), "history": history}, out / f"rank{distributed.rank()}.pt")
distributed.shutdown()
