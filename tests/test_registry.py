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
BUILTINS = {
    **SEED_BUILTINS,
    "segmenters": {"unet"},  # the synthetic-anomaly detector's networks
    "steps": {"register", "reorient", "resample", "foreground", "normalize", "crop", "pad"},
}


def test_builtins_registered_through_entry_points():
    reg = Registry(get_plugin_manager())
    for family, names in BUILTINS.items():
        assert names <= set(reg.names(family)), family
        assert {i.package for i in reg.infos(family) if i.name in names} == {"anomaly3d"}
    eps = [ep for ep in importlib.metadata.distribution("anomaly3d").entry_points if ep.group == "anomaly3d"]
    assert {ep.name for ep in eps} == set(BUILTINS)


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


CLASH = """
from anomaly3d_core import hookimpl
from anomaly3d_plugins.thresholds.statistical import SigmaThreshold

class Clash(SigmaThreshold):
    name = "percentile"

@hookimpl
def anomaly3d_register_thresholds():
    return [Clash]
"""


def test_duplicate_name_is_an_error_for_that_name_only(monkeypatch):
    _install_fake_plugin(monkeypatch, "fake_dup_plugin", CLASH, dist_name="clashing-pkg")
    reg = Registry(get_plugin_manager())  # the registry itself builds
    assert reg.get("thresholds", "sigma").name == "sigma"  # other names are untouched
    with pytest.raises(PluginError) as err:
        reg.get("thresholds", "percentile")
    msg = str(err.value)
    assert "percentile" in msg and "'anomaly3d'" in msg and "'clashing-pkg'" in msg
    assert "'anomaly3d:percentile'" in msg and "'clashing-pkg:percentile'" in msg
    assert "ANOMALY3D_DISABLE_PLUGINS=clashing-pkg" in msg
    # a qualified name picks one
    assert reg.get("thresholds", "clashing-pkg:percentile").__name__ == "Clash"
    assert reg.get("thresholds", "anomaly3d:percentile").__name__ == "PercentileThreshold"
    assert reg.get("thresholds", "Clashing_Pkg:percentile").__name__ == "Clash"  # pip's name rules
    with pytest.raises(PluginError, match="did you mean 'anomaly3d:percentile'"):
        reg.get("thresholds", "anomaly3d:percentil")
    # and a saved model's provenance picks one too
    pinned = reg.with_preferences({("thresholds", "percentile"): "anomaly3d"})
    assert pinned.get("thresholds", "percentile").__name__ == "PercentileThreshold"
    assert reg.clashes("thresholds").keys() == {"percentile"}


def test_qualified_names_validate_in_configs(monkeypatch):
    from anomaly3d_core.config import build_config
    from anomaly3d_core.errors import ConfigError

    _install_fake_plugin(monkeypatch, "fake_dup_plugin", CLASH, dist_name="clashing-pkg")
    reg = Registry(get_plugin_manager())
    with pytest.raises(ConfigError, match=r"threshold.type: duplicate threshold name 'percentile'"):
        build_config({}, registry=reg)
    cfg = build_config({"threshold": {"type": "clashing-pkg:percentile", "args": {"k": 2.0}}}, registry=reg)
    assert cfg.threshold.type == "clashing-pkg:percentile" and cfg.threshold.args == {"k": 2.0}


def test_disable_one_package(monkeypatch):
    _install_fake_plugin(monkeypatch, "fake_dup_plugin", CLASH, dist_name="clashing-pkg")
    monkeypatch.setenv("ANOMALY3D_DISABLE_PLUGINS", "Clashing_Pkg, not-installed")
    reg = Registry(get_plugin_manager())
    assert reg.get("thresholds", "percentile").__name__ == "PercentileThreshold"
    assert reg.disabled == [("clashing-pkg", "9.9")] and reg.unknown_disabled == ["not-installed"]
    assert reg.package_state("clashing-pkg") == "disabled"
    # the built-ins cannot be turned off
    reg = Registry(get_plugin_manager(disabled=["anomaly3d"]))
    assert "percentile" in reg.names("thresholds")


def test_broken_plugin_reports_package(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz", group="anomaly3d")
    real = list(importlib.metadata.distributions())
    monkeypatch.setattr(
        reg_mod.importlib.metadata, "distributions", lambda: [*real, _FakeDist("broken-pkg", "0.1", [ep])]
    )
    reg = Registry(get_plugin_manager())  # does not raise: the package is set aside
    assert "percentile" in reg.names("thresholds")
    [broken] = reg.broken
    assert broken.package == "broken-pkg" and "no_such_module_xyz" in broken.line()
    assert "ModuleNotFoundError" in broken.line() and "ANOMALY3D_DISABLE_PLUGINS=broken-pkg" in broken.line()


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
