"""Plugin discovery through entry points, duplicates, unknown names and the autoload switch."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types

import pytest

from anomaly3d_core import registry as reg_mod
from anomaly3d_core.errors import PluginError
from anomaly3d_core.hookspecs import hookimpl
from anomaly3d_core.registry import Registry, get_plugin_manager
from anomaly3d_plugins.thresholds.statistical import PercentileThreshold

SEED_BUILTINS = {
    "extractors": {"simple", "resnet18", "resnet34", "resnet50", "identity"},
    "autoencoders": {"standard", "variational", "denoising", "contractive"},
    "thresholds": {"percentile", "sigma", "mad", "iqr", "otsu", "triangle", "yen"},
    "loaders": {"nifti", "numpy", "dicom", "itk"},
}


def test_builtins_registered_through_entry_points():
    reg = Registry(get_plugin_manager())
    for family, names in SEED_BUILTINS.items():
        assert names <= set(reg.names(family)), family
        assert {i.package for i in reg.infos(family) if i.name in names} == {"anomaly3d"}
    eps = [ep for ep in importlib.metadata.distribution("anomaly3d").entry_points if ep.group == "anomaly3d"]
    assert {ep.name for ep in eps} == set(SEED_BUILTINS)


class _FakeDist:
    """Just enough of importlib.metadata.Distribution, as pluggy's own tests fake it."""

    def __init__(self, name: str, version: str, entry_points: list[importlib.metadata.EntryPoint]) -> None:
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = entry_points


def _install_fake_plugin(monkeypatch, module_name: str, source: str, dist_name: str = "anomaly3d-extra"):
    module = types.ModuleType(module_name)
    exec(textwrap.dedent(source), module.__dict__)
    monkeypatch.setitem(sys.modules, module_name, module)
    ep = importlib.metadata.EntryPoint(name="extra", value=module_name, group="anomaly3d")
    real = list(importlib.metadata.distributions())
    monkeypatch.setattr(
        reg_mod.importlib.metadata, "distributions", lambda: [*real, _FakeDist(dist_name, "9.9", [ep])]
    )
    return module


THIRD_PARTY = """
from anomaly3d_core import hookimpl
from anomaly3d_core.interfaces import ThresholdMethod
import numpy as np

class MaxThreshold(ThresholdMethod):
    name = "max"
    def _compute(self, scores):
        return float(np.max(scores))

@hookimpl
def anomaly3d_register_thresholds():
    return [MaxThreshold]
"""


def test_third_party_plugin_discovered(monkeypatch):
    _install_fake_plugin(monkeypatch, "fake_a3d_plugin", THIRD_PARTY)
    reg = Registry(get_plugin_manager())
    info = reg.info("thresholds", "max")
    assert (info.package, info.version) == ("anomaly3d-extra", "9.9")
    assert info.cls().fit([1.0, 5.0, 2.0]).threshold_ == 5.0


def test_autoload_env_keeps_third_party_out(monkeypatch):
    _install_fake_plugin(monkeypatch, "fake_a3d_plugin", THIRD_PARTY)
    monkeypatch.setenv("ANOMALY3D_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry(get_plugin_manager())
    assert "max" not in reg.names("thresholds")
    assert "percentile" in reg.names("thresholds")


def test_duplicate_name_names_both_packages(monkeypatch):
    _install_fake_plugin(
        monkeypatch,
        "fake_dup_plugin",
        """
from anomaly3d_core import hookimpl
from anomaly3d_plugins.thresholds.statistical import SigmaThreshold

class Clash(SigmaThreshold):
    name = "percentile"

@hookimpl
def anomaly3d_register_thresholds():
    return [Clash]
""",
        dist_name="clashing-pkg",
    )
    with pytest.raises(PluginError) as err:
        Registry(get_plugin_manager())
    msg = str(err.value)
    assert "percentile" in msg and "'anomaly3d'" in msg and "'clashing-pkg'" in msg


def test_broken_plugin_reports_package(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz", group="anomaly3d")
    real = list(importlib.metadata.distributions())
    monkeypatch.setattr(
        reg_mod.importlib.metadata, "distributions", lambda: [*real, _FakeDist("broken-pkg", "0.1", [ep])]
    )
    with pytest.raises(PluginError, match="broken-pkg"):
        get_plugin_manager()


def test_misspelt_hook_fails_loudly(monkeypatch):
    _install_fake_plugin(
        monkeypatch,
        "fake_typo_plugin",
        """
from anomaly3d_core import hookimpl

@hookimpl
def anomaly3d_register_thresold():
    return []
""",
    )
    from pluggy import PluginValidationError

    with pytest.raises(PluginValidationError):
        get_plugin_manager()


def test_unknown_name_suggests():
    reg = Registry(get_plugin_manager())
    with pytest.raises(PluginError, match=r"did you mean 'variational'\? available: .*contractive"):
        reg.get("autoencoders", "variatonal")
    with pytest.raises(PluginError, match="did you mean 'extractors'"):
        reg.get("extractor", "simple")


def test_hookimpl_exported_for_plugin_authors():
    import anomaly3d_core

    assert anomaly3d_core.hookimpl is hookimpl
    assert PercentileThreshold.name == "percentile"
