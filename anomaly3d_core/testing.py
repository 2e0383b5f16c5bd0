"""The conformance kit: the checks anomaly3d runs on its own components, for any plugin's test suite.

A plugin package tests its components against the same contract (:mod:`anomaly3d_core.interfaces`)
as the built-ins, as scikit-learn's ``parametrize_with_checks`` does for estimators::

    from anomaly3d_core.testing import parametrize_with_checks
    from my_package import FilterBank, MyLoader, PCAAutoencoder, TopFraction

    @parametrize_with_checks([FilterBank, PCAAutoencoder, TopFraction, MyLoader])
    def test_conformance(component, check):
        check(component)

``check_component(cls)`` runs every check on one class and raises :class:`ConformanceError`
(an ``AssertionError``) at the first failure, naming the component, the check and the fix.

Components are built with their own defaults, or with what their ``example_params()``
classmethod returns (to keep a big network small here); a loader's check reads the example file
its ``example_file(folder)`` classmethod writes. Nothing here depends on pytest except
:func:`parametrize_with_checks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from anomaly3d_core.checks_common import (
    Check,
    ConformanceError,
    _check,
    check_declaration,
    check_params,
)
from anomaly3d_core.checks_io import (
    check_loader_declaration,
    check_loader_example,
    check_loader_rejects_garbage,
    check_threshold,
)
from anomaly3d_core.checks_models import (
    check_autoencoder_fit,
    check_autoencoder_forward,
    check_autoencoder_scores,
    check_autoencoder_state,
    check_extractor_forward,
    check_extractor_frozen,
    check_extractor_in_channels,
    check_extractor_layers,
    check_extractor_state,
)
from anomaly3d_core.checks_segmenters import (
    check_segmenter_fit,
    check_segmenter_forward,
    check_segmenter_state,
)
from anomaly3d_core.checks_steps import check_step_call, check_step_grid, check_step_invert
from anomaly3d_core.interfaces import (
    Autoencoder,
    FeatureExtractor,
    PreprocessingStep,
    Segmenter,
    ThresholdMethod,
    VolumeLoader,
)

__all__ = [
    "Check",
    "ConformanceError",
    "check_autoencoder_fit",
    "check_autoencoder_forward",
    "check_autoencoder_scores",
    "check_autoencoder_state",
    "check_component",
    "check_declaration",
    "check_extractor_forward",
    "check_extractor_frozen",
    "check_extractor_in_channels",
    "check_extractor_layers",
    "check_extractor_state",
    "check_loader_declaration",
    "check_loader_example",
    "check_loader_rejects_garbage",
    "check_params",
    "check_segmenter_fit",
    "check_segmenter_forward",
    "check_segmenter_state",
    "check_step_call",
    "check_step_grid",
    "check_step_invert",
    "check_threshold",
    "checks_for",
    "parametrize_with_checks",
    "registered_components",
]

_CHECKS: dict[type, list[Check]] = {
    FeatureExtractor: [
        check_extractor_layers,
        check_extractor_forward,
        check_extractor_in_channels,
        check_extractor_frozen,
        check_extractor_state,
    ],
    Autoencoder: [
        check_autoencoder_forward,
        check_autoencoder_fit,
        check_autoencoder_scores,
        check_autoencoder_state,
    ],
    ThresholdMethod: [check_threshold],
    VolumeLoader: [check_loader_declaration, check_loader_example, check_loader_rejects_garbage],
    Segmenter: [check_segmenter_forward, check_segmenter_fit, check_segmenter_state],
    PreprocessingStep: [check_step_call, check_step_invert, check_step_grid],
}


def checks_for(cls: type) -> list[Check]:
    """Every check that applies to ``cls``: the common ones, then its family's."""
    common: list[Check] = [check_declaration, check_params]
    for base, checks in _CHECKS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return common + checks
    return [check_declaration]


@_check
def check_component(cls: type) -> None:
    """Run every check on ``cls``; raises :class:`ConformanceError` at the first failure."""
    for check in checks_for(cls):
        check(cls)


def _as_class(component: Any) -> type:
    return getattr(component, "cls", component)  # a registry ComponentInfo, or the class itself


def parametrize_with_checks(components: Iterable[Any]) -> Any:
    """A ``pytest.mark.parametrize`` over ``(component, check)`` pairs, one test per check, with ids such
    as ``pca-check_autoencoder_fit``. ``components`` are classes (or registry ``ComponentInfo``)."""
    import pytest

    pairs, ids = [], []
    for component in components:
        cls = _as_class(component)
        label = getattr(component, "qualified", None) or getattr(cls, "name", None) or cls.__qualname__
        for check in checks_for(cls):
            pairs.append((cls, check))
            ids.append(f"{label}-{check.__name__}")
    return pytest.mark.parametrize(("component", "check"), pairs, ids=ids)


def registered_components(
    families: str | Sequence[str] | None = None, package: str | None = None, registry: Any = None
) -> list[Any]:
    """The registered components (``ComponentInfo``) of ``families`` (default: all), optionally of one
    ``package`` only: e.g. ``parametrize_with_checks(registered_components(package='my-package'))``
    checks a package as it is installed, through its entry points."""
    from anomaly3d_core.registry import FAMILIES, get_registry, normalize_package

    reg = registry or get_registry()
    chosen = [families] if isinstance(families, str) else list(families or FAMILIES)
    return [
        info
        for family in chosen
        for info in reg.infos(family)
        if package is None or normalize_package(info.package) == normalize_package(package)
    ]
