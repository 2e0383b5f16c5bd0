"""A threshold method: the (1 - fraction) quantile of the normal scores."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from anomaly3d_core.interfaces import Params, ThresholdMethod


class TopFractionParams(Params):
    fraction: float = Field(0.001, gt=0, lt=1, description="fraction of normal scores above the threshold")


class TopFraction(ThresholdMethod):
    """Flags the given fraction of the highest normal scores."""

    name = "top_fraction"
    api_version = 1
    calibration = "normal"  # fitted once on held-out normal scans, saved with the model
    Params = TopFractionParams

    def _compute(self, scores: np.ndarray) -> float:
        return float(np.quantile(scores, 1 - self.params.fraction))
