"""Every registered component of every family meets its contract (new plugins are tested for free).

The checks are the conformance kit that plugin packages run in their own test suites
(:mod:`anomaly3d_core.testing`); here they run over everything installed, built-ins included.
"""

from __future__ import annotations

from anomaly3d_core.testing import parametrize_with_checks, registered_components


@parametrize_with_checks(registered_components())
def test_component(component, check):
    check(component)
