"""A MONAI side-by-side: a convolutional AutoEncoder of comparable size, trained on random crops
of the preprocessed normal volumes and applied with MONAI's Gaussian-blended sliding window.
The score is the smoothed squared residual, mapped back to each scan's grid like ours.
Only used when MONAI is installed (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from anomaly3d_core.config import PreprocessingConfig
from anomaly3d_core.io.volume import Volume
from anomaly3d_core.postprocess.thresholding import volume_score
from anomaly3d_core.preprocess.preprocessing import Preprocessor, foreground_mask


class MonaiAutoEncoder:
    name = "monai_autoencoder"

    def __init__(
        self,
        roi: int = 32,
        epochs: int = 30,
        steps: int = 40,
        batch: int = 8,
        sigma: float = 1.5,
        seed: int = 0,
    ) -> None:
        self.roi, self.epochs, self.steps, self.batch, self.sigma, self.seed = (
            roi,
            epochs,
            steps,
            batch,
            sigma,
            seed,
        )
        self.pre = Preprocessor(PreprocessingConfig())

    def fit(self, volumes: Sequence[Volume]) -> MonaiAutoEncoder:
        from monai.networks.nets import AutoEncoder

        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        arrays = [self.pre(v).array for v in volumes]
        self.net_ = AutoEncoder(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=(16, 32, 64),
            strides=(2, 2, 2),
            num_res_units=1,
        )
        opt = torch.optim.Adam(self.net_.parameters(), lr=1e-3)
        for _ in range(self.epochs):
            for _ in range(self.steps):
                crops = []
                for _ in range(self.batch):
                    a = arrays[rng.integers(len(arrays))]
                    st = [rng.integers(0, max(1, s - self.roi + 1)) for s in a.shape]
                    c = a[tuple(slice(x, x + self.roi) for x in st)]
                    crops.append(np.pad(c, [(0, self.roi - n) for n in c.shape], mode="edge"))
                x = torch.from_numpy(np.stack(crops)[:, None])
                loss = torch.nn.functional.mse_loss(self.net_(x), x)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net_.eval()
        normal = [self._prepared_scores(self.pre(v)) for v in volumes[: max(1, len(volumes) // 4)]]
        self.threshold_ = float(np.percentile(np.concatenate([s[m] for s, m in normal]), 99.5))
        return self

    @torch.no_grad()
    def _prepared_scores(self, prep) -> tuple[np.ndarray, np.ndarray]:
        from monai.inferers import sliding_window_inference

        x = torch.from_numpy(prep.array)[None, None]
        recon = sliding_window_inference(x, (self.roi,) * 3, 8, self.net_, overlap=0.5, mode="gaussian")
        s = ndimage.gaussian_filter(((recon - x) ** 2)[0, 0].numpy(), self.sigma)
        s[~prep.mask] = 0
        return s, prep.mask

    def score(self, v: Volume) -> tuple[np.ndarray, float]:
        prep = self.pre(v)
        s, m = self._prepared_scores(prep)
        native = Preprocessor.invert(s, prep.record)
        native[~foreground_mask(v.array, "nonzero")] = 0
        return native, volume_score(s, m, 0.01)


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("monai") is not None
