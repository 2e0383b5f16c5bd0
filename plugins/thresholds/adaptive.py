"""Histogram-based thresholds from scikit-image, for a score map or a mixed score distribution."""

from __future__ import annotations

import numpy as np
from pydantic import Field
from skimage import filters

from anomaly3d_core.interfaces import Params, ThresholdMethod


class HistogramParams(Params):
    nbins: int = Field(256, ge=2)


class _SkimageThreshold(ThresholdMethod):
    calibration = "adaptive"
    Params = HistogramParams

    @staticmethod
    def _method(values: np.ndarray, nbins: int) -> float:
        raise NotImplementedError

    def _compute(self, scores: np.ndarray) -> float:
        if scores.min() == scores.max():
            return float(scores.max())
        return float(self._method(scores, nbins=self.params.nbins))


class OtsuThreshold(_SkimageThreshold):
    """Maximises the between-class variance (Otsu, 1979)."""

    name = "otsu"
    _method = staticmethod(lambda v, nbins: filters.threshold_otsu(v, nbins=nbins))


class TriangleThreshold(_SkimageThreshold):
    """Triangle method (Zack et al., 1977); suited to one dominant mode with a long tail."""

    name = "triangle"
    _method = staticmethod(lambda v, nbins: filters.threshold_triangle(v, nbins=nbins))


class YenThreshold(_SkimageThreshold):
    """Maximum-correlation criterion (Yen et al., 1995)."""

    name = "yen"
    _method = staticmethod(lambda v, nbins: filters.threshold_yen(v, nbins=nbins))
