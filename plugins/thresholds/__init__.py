"""Built-in threshold methods: calibrated on normal scores, or adaptive (scikit-image)."""

from anomaly3d_core.hookspecs import hookimpl
from anomaly3d_plugins.thresholds.adaptive import OtsuThreshold, TriangleThreshold, YenThreshold
from anomaly3d_plugins.thresholds.statistical import (
    IQRThreshold,
    MADThreshold,
    PercentileThreshold,
    SigmaThreshold,
)

__all__ = [
    "IQRThreshold",
    "MADThreshold",
    "OtsuThreshold",
    "PercentileThreshold",
    "SigmaThreshold",
    "TriangleThreshold",
    "YenThreshold",
]


@hookimpl
def anomaly3d_register_thresholds():
    return [
        PercentileThreshold,
        SigmaThreshold,
        MADThreshold,
        IQRThreshold,
        OtsuThreshold,
        TriangleThreshold,
        YenThreshold,
    ]
