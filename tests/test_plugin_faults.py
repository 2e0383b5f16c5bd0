"""Fault isolation: a plugin package broken in any of the usual ways is set aside with one line naming
the package and the fix, and every command that does not need it keeps working.

Packages are faked as ``importlib.metadata`` distributions, as pluggy's own tests do;
``tests/test_plugin_packages.py`` does the same with packages really installed.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types

import pytest

from anomaly3d_core import registry as reg_mod
from anomaly3d_core.cli import main
from anomaly3d_core.errors import PluginError
from anomaly3d_core.registry import Registry, get_plugin_manager


class _FakeDist:
    def __init__(self, name: str, version: str, entry_points: list) -> None:
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = entry_points


GOOD = """
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

HEADER = """
from anomaly3d_core import hookimpl
from anomaly3d_core.interfaces import ThresholdMethod, VolumeLoader
import numpy as np

class Cut(ThresholdMethod):
    name = "cut"
    def _compute(self, scores):
        return float(np.median(scores))
"""

# one broken package per way of breaking: (module source or None for an import failure, the words
# the one-line report must hold)
BROKEN = {
    "import-fails": (None, ["fails to import", "ModuleNotFoundError"]),
    "raises-on-import": (
        "raise RuntimeError('no GPU driver')",
        ["fails to import", "RuntimeError: no GPU driver"],
    ),
    "misspelt-hook": (
        HEADER + "@hookimpl\ndef anomaly3d_register_threshold():\n    return [Cut]\n",
        ["unknown hook 'anomaly3d_register_threshold'", "did you mean 'anomaly3d_register_thresholds'"],
    ),
    "class-not-list": (
        HEADER + "@hookimpl\ndef anomaly3d_register_thresholds():\n    return Cut\n",
        ["returns the class Cut instead of a list", "return [Cut]"],
    ),
    "no-hookimpl": (
        HEADER + "def anomaly3d_register_thresholds():\n    return [Cut]\n",
        ["not marked with @hookimpl", "from anomaly3d_core import hookimpl"],
    ),
    "wrong-family": (
        HEADER + "@hookimpl\ndef anomaly3d_register_loaders():\n    return [Cut]\n",
        [
            "a threshold method (family 'thresholds'), not a volume loader",
            "anomaly3d_register_thresholds instead",
        ],
    ),
    "hook-raises": (
        HEADER + "@hookimpl\ndef anomaly3d_register_thresholds():\n    raise KeyError('cfg')\n",
        ["anomaly3d_register_thresholds() raised KeyError"],
    ),
    "abstract": (
        HEADER.replace(
            "    def _compute(self, scores):\n        return float(np.median(scores))\n", "    pass\n"
        )
        + "@hookimpl\ndef anomaly3d_register_thresholds():\n    return [Cut]\n",
        ["leaves abstract methods unimplemented: _compute"],
    ),
    "no-name": (
        HEADER.replace('name = "cut"', "pass")
        + "@hookimpl\ndef anomaly3d_register_thresholds():\n    return [Cut]\n",
        ["has no valid name"],
    ),
    "bad-params": (
        HEADER.replace('name = "cut"', 'name = "cut"\n    Params = dict')
        + "@hookimpl\ndef anomaly3d_register_thresholds():\n    return [Cut]\n",
        ["has no pydantic Params model", "subclass of anomaly3d_core.interfaces.Params"],
    ),
    "hook-args": (
        HEADER + "@hookimpl\ndef anomaly3d_register_thresholds(config):\n    return [Cut]\n",
        ["do not match the hook specifications"],
    ),
    "too-new": (
        HEADER.replace('name = "cut"', 'name = "cut"\n    api_version = 99')
        + "@hookimpl\ndef anomaly3d_register_thresholds():\n    return [Cut]\n",
        ["written for anomaly3d plugin API 99", "pip install -U anomaly3d"],
    ),
}


def _install(monkeypatch, packages: dict[str, str | None]) -> None:
    """Fake distributions named after the keys, each with one entry point to a module of that source."""
    dists = []
    for name, source in packages.items():
        module_name = "fake_" + name.replace("-", "_")
        if source is not None:
            module = types.ModuleType(module_name)
            if source.startswith("raise"):
                ep_value = module_name
                monkeypatch.delitem(sys.modules, module_name, raising=False)
                monkeypatch.setattr(
                    importlib.metadata.EntryPoint,
                    "load",
                    _raising_load(importlib.metadata.EntryPoint.load, module_name, source),
                )
            else:
                exec(textwrap.dedent(source), module.__dict__)
                monkeypatch.setitem(sys.modules, module_name, module)
                ep_value = module_name
        else:
            ep_value = "no_such_module_for_" + module_name
        ep = importlib.metadata.EntryPoint(name="main", value=ep_value, group="anomaly3d")
        dists.append(_FakeDist(name, "0.1", [ep]))
    real = list(importlib.metadata.distributions())
    monkeypatch.setattr(reg_mod.importlib.metadata, "distributions", lambda: [*real, *dists])
    reg_mod._cached_registry.cache_clear()
    monkeypatch.setattr(reg_mod, "_warned", set())


def _raising_load(original, module_name: str, source: str):
    def load(self):
        if self.value == module_name:
            exec(source, {})
        return original(self)

    return load


@pytest.fixture(autouse=True)
def _fresh_registry():
    reg_mod._cached_registry.cache_clear()
    yield
    reg_mod._cached_registry.cache_clear()


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_each_breakage_is_isolated_and_explained(monkeypatch, kind):
    source, words = BROKEN[kind]
    _install(monkeypatch, {f"pkg-{kind}": source, "good-pkg": GOOD})
    reg = Registry(get_plugin_manager())
    # the good package and the built-ins work
    assert reg.get("thresholds", "max").__name__ == "MaxThreshold"
    assert reg.get("thresholds", "percentile").__name__ == "PercentileThreshold"
    assert "cut" not in reg.names("thresholds")
    lines = [b.line() for b in reg.broken]
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"package 'pkg-{kind}' 0.1" in line and "\n" not in line
    for word in words:
        assert word in line, line
    assert f"ANOMALY3D_DISABLE_PLUGINS=pkg-{kind}" in line
    # asking for a name it might have provided points at it
    with pytest.raises(PluginError, match=f"broken plugin packages that may provide it: pkg-{kind}"):
        reg.get("thresholds", "cut")


def test_plugins_command_lists_broken_packages(monkeypatch, capsys):
    _install(monkeypatch, {f"pkg-{kind}": src for kind, (src, _) in BROKEN.items()} | {"good-pkg": GOOD})
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "  max " in out and "good-pkg 0.1" in out
    section = out.split("broken plugin packages (skipped; everything else works):", 1)[1]
    for kind, (_, words) in BROKEN.items():
        assert f"package 'pkg-{kind}'" in section and words[0] in section, kind
    assert "Traceback" not in out + err


def test_other_commands_warn_once_and_work(monkeypatch, caplog, tmp_path, saved_model, demo_dir):
    _install(monkeypatch, {"pkg-class-not-list": BROKEN["class-not-list"][0]})
    scan = sorted((demo_dir / "test").iterdir())[-1]
    code = main(["score", "--model", str(saved_model), "--input", str(scan), "--out", str(tmp_path / "o")])
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if "pkg-class-not-list" in r.getMessage()]
    assert len(warned) == 1 and "skipped, everything else works" in warned[0]
    assert (tmp_path / "o" / "scores.csv").is_file()


def test_disable_switch_on_the_command_line(monkeypatch, capsys):
    _install(monkeypatch, {"pkg-misspelt-hook": BROKEN["misspelt-hook"][0], "good-pkg": GOOD})
    # set (empty) through monkeypatch, so what main's -p writes into os.environ is undone afterwards:
    # a leak would turn these packages off for every later test and the subprocesses they start
    monkeypatch.setenv("ANOMALY3D_DISABLE_PLUGINS", "")
    assert main(["-p", "no:pkg-misspelt-hook", "plugins", "-p", "no:good-pkg"]) == 0  # before or after
    out = capsys.readouterr().out
    assert "broken plugin packages" not in out and "  max " not in out
    assert "turned off" in out and "pkg-misspelt-hook 0.1" in out and "good-pkg 0.1" in out
    assert main(["plugins", "-p", "pkg-misspelt-hook"]) == 2
    assert "only -p no:PACKAGE" in capsys.readouterr().err


def test_a_clash_does_not_break_a_saved_model(monkeypatch, saved_model, demo_dir, tmp_path, capsys):
    """A model saved with the built-in 'percentile' keeps loading when a package later registers that name."""
    clash = GOOD.replace('name = "max"', 'name = "percentile"')
    _install(monkeypatch, {"clashing-pkg": clash})
    scan = sorted((demo_dir / "test").iterdir())[-1]
    code = main(["score", "--model", str(saved_model), "--input", str(scan), "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    # while a new config that names it plainly is told how to choose
    code = main(
        [
            "fit",
            "--train",
            str(demo_dir / "train"),
            "--out",
            str(tmp_path / "m"),
            "--set",
            "tracking.enabled=false",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "duplicate threshold name 'percentile'" in err and "'clashing-pkg:percentile'" in err


def test_deprecated_api_version_warns(monkeypatch):
    from anomaly3d_core import interfaces

    monkeypatch.setattr(interfaces, "API_VERSION", 2)
    monkeypatch.setattr(interfaces, "DEPRECATED_API_VERSIONS", {1: "rename X to Y"})
    old = GOOD.replace('name = "max"', 'name = "max"\n    api_version = 1')
    _install(monkeypatch, {"old-pkg": old})
    reg = Registry(get_plugin_manager())
    assert reg.get("thresholds", "max").__name__ == "MaxThreshold"  # still works
    assert reg.deprecations == [
        "package 'old-pkg' 0.1: MaxThreshold ('max') is written for the deprecated anomaly3d plugin API 1 "
        "(current: 2); rename X to Y"
    ]
    monkeypatch.setattr(interfaces, "MIN_API_VERSION", 2)  # retired
    reg = Registry(get_plugin_manager())
    assert "max" not in reg.names("thresholds") and "no longer supported" in reg.broken[0].line()
