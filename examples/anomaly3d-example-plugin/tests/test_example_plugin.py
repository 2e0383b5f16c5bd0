"""The package's own tests: anomaly3d's conformance kit on each component, and the entry point."""

from __future__ import annotations

import numpy as np
import torch
from anomaly3d_example_plugin import FilterBank, MghLoader, PCAAutoencoder, TopFraction

from anomaly3d_core.testing import check_component, parametrize_with_checks, registered_components

COMPONENTS = [FilterBank, PCAAutoencoder, TopFraction, MghLoader]


@parametrize_with_checks(COMPONENTS)
def test_conformance(component, check):
    check(component)


def test_installed_entry_point_registers_every_component():
    """Through the installed entry point, as anomaly3d itself finds the package."""
    found = registered_components(package="anomaly3d-example-plugin")
    assert {(i.family, i.name) for i in found} == {
        ("extractors", "filterbank"),
        ("autoencoders", "pca"),
        ("thresholds", "top_fraction"),
        ("loaders", "mgh"),
    }
    for info in found:
        check_component(info.cls)


def test_pca_reconstructs_its_subspace_exactly():
    basis = torch.randn(3, 10)
    x = torch.randn(50, 3) @ basis + 5.0
    model = PCAAutoencoder(10, {"n_components": 3})
    model.fit_closed_form(x)
    assert torch.allclose(model(x)["recon"], x, atol=1e-3)
    outlier = x[:1] + 10 * torch.randn(1, 10)
    assert model.anomaly_score(outlier, model(outlier)) > model.anomaly_score(x, model(x)).max()


def test_filterbank_smooths_a_constant_to_itself():
    x = torch.full((1, 1, 8, 8, 8), 3.0)
    bank = FilterBank().freeze()(x, ["bank"])["bank"]
    assert torch.allclose(bank[:, [0, 1, 3]], x.expand(1, 3, 8, 8, 8), atol=1e-5)
    assert float(bank[:, [2, 4]].abs().max()) < 1e-4


def test_top_fraction_flags_that_fraction():
    scores = np.arange(10000, dtype=float)
    method = TopFraction(fraction=0.01).fit(scores)
    assert method.predict(scores).mean() == 0.01
