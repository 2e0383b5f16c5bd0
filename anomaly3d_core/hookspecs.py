"""Hook specifications of the ``anomaly3d`` plugin host.

A plugin is a module (or object) registered under the ``anomaly3d`` entry-point group that
implements one or more of these hooks with :data:`hookimpl`. Each hook takes no arguments and
returns a list (not a single class) of component classes of its family; every class carries a
unique ``name`` within its family. What each class must provide is in
:mod:`anomaly3d_core.interfaces`, and :mod:`anomaly3d_core.testing` checks it. A hook that is
misspelt, unmarked, or returns something else sets its package aside as broken (see
:mod:`anomaly3d_core.registry`), without affecting other packages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from anomaly3d_core.interfaces import (
        Autoencoder,
        FeatureExtractor,
        PreprocessingStep,
        Segmenter,
        ThresholdMethod,
        VolumeLoader,
    )

PROJECT = "anomaly3d"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def anomaly3d_register_extractors() -> list[type[FeatureExtractor]]:
    """Return feature-extractor classes (subclasses of ``interfaces.FeatureExtractor``).

    Each maps a ``(B, 1, D, H, W)`` volume to named feature maps; ``identity`` returns the input.
    """


@hookspec
def anomaly3d_register_autoencoders() -> list[type[Autoencoder]]:
    """Return autoencoder classes (subclasses of ``interfaces.Autoencoder``).

    Each reconstructs embedding vectors of shape ``(N, input_dim)`` and scores them.
    """


@hookspec
def anomaly3d_register_thresholds() -> list[type[ThresholdMethod]]:
    """Return threshold-method classes (subclasses of ``interfaces.ThresholdMethod``).

    Each is fitted on anomaly scores (normal-only or a score map) and exposes ``threshold_``.
    """


@hookspec
def anomaly3d_register_loaders() -> list[type[VolumeLoader]]:
    """Return volume-loader classes (subclasses of ``interfaces.VolumeLoader``).

    Each reads one file format (or a DICOM folder) into a ``Volume`` with its geometry.
    """


@hookspec
def anomaly3d_register_segmenters() -> list[type[Segmenter]]:
    """Return segmentation-network classes (subclasses of ``interfaces.Segmenter``).

    Each maps ``(B, C, D, H, W)`` scans to per-voxel logits ``(B, 1, D, H, W)``; the
    synthetic-anomaly detector trains one to find what is foreign.
    """


@hookspec
def anomaly3d_register_steps() -> list[type[PreprocessingStep]]:
    """Return preprocessing-step classes (subclasses of ``interfaces.PreprocessingStep``).

    Each maps a scan on one grid to the next (``__call__(state) -> state``) and maps a score map
    back (``invert``); configs add one by name to ``data.preprocessing.steps``.
    """


def _families() -> tuple[str, ...]:
    prefix = "anomaly3d_register_"
    return tuple(
        name.removeprefix(prefix)
        for name, fn in globals().items()
        if name.startswith(prefix) and hasattr(fn, f"{PROJECT}_spec")
    )


#: The plugin families, one per ``anomaly3d_register_<family>`` hook above (the single list).
FAMILIES: tuple[str, ...] = _families()
