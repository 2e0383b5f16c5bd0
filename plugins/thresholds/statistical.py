"""Thresholds calibrated on scores of held-out normal data."""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy.stats import median_abs_deviation

from anomaly3d_core.interfaces import Params, ThresholdMethod


class PercentileParams(Params):
    percentile: float = Field(99.0, gt=0, lt=100)


class PercentileThreshold(ThresholdMethod):
    """The given percentile of the normal scores."""

    name = "percentile"
    Params = PercentileParams

    def _compute(self, scores: np.ndarray) -> float:
        return float(np.percentile(scores, self.params.percentile))


class SpreadParams(Params):
    k: float = Field(3.0, gt=0, description="multiplier of the spread (sigma_multiplier in the seed API)")


class SigmaThreshold(ThresholdMethod):
    """mean + k * std."""

    name = "sigma"
    Params = SpreadParams

    def _compute(self, scores: np.ndarray) -> float:
        return float(scores.mean() + self.params.k * scores.std())


class MADThreshold(ThresholdMethod):
    """median + k * MAD, the MAD scaled by 1.4826 to match a normal std."""

    name = "mad"
    Params = SpreadParams

    def _compute(self, scores: np.ndarray) -> float:
        return float(np.median(scores) + self.params.k * median_abs_deviation(scores, scale="normal"))


class IQRParams(Params):
    k: float = Field(1.5, gt=0)


class IQRThreshold(ThresholdMethod):
    """Q3 + k * IQR (Tukey's fence)."""

    name = "iqr"
    Params = IQRParams

    def _compute(self, scores: np.ndarray) -> float:
        q1, q3 = np.percentile(scores, [25, 75])
        return float(q3 + self.params.k * (q3 - q1))
