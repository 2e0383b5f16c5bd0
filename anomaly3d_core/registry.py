"""Plugin discovery: ``get_plugin_manager()`` and a name -> class :class:`Registry`.

Built-in components live in the ``anomaly3d`` distribution and are found through the same
``anomaly3d`` entry-point group as any third-party package. Setting the environment variable
``ANOMALY3D_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the built-ins.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from anomaly3d_core import hookspecs
from anomaly3d_core.errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "anomaly3d"
BUILTIN_DISTRIBUTION = "anomaly3d"
DISABLE_AUTOLOAD_ENV = "ANOMALY3D_DISABLE_PLUGIN_AUTOLOAD"
FAMILIES = hookspecs.FAMILIES


@dataclass(frozen=True)
class ComponentInfo:
    """One registered component and the package that provided it."""

    family: str
    name: str
    cls: type
    package: str
    version: str


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def get_plugin_manager(autoload: bool | None = None) -> pluggy.PluginManager:
    """Create a plugin manager with every ``anomaly3d`` entry point registered.

    ``autoload=False`` (or the ``ANOMALY3D_DISABLE_PLUGIN_AUTOLOAD`` variable) keeps third-party
    packages out; the built-ins are always loaded, through their entry points.
    """
    if autoload is None:
        autoload = not _autoload_disabled()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm._anomaly3d_dists = {}  # plugin name -> (package, version)
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["name"] or "?"
        if not autoload and dist_name != BUILTIN_DISTRIBUTION:
            continue
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            plugin_name = f"{dist_name}:{ep.name}"
            if pm.has_plugin(plugin_name):
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the cause
                raise PluginError(
                    f"plugin '{ep.name}' of package '{dist_name}' failed to import ({ep.value}): {exc}"
                ) from exc
            pm.register(plugin, name=plugin_name)
            pm._anomaly3d_dists[plugin_name] = (dist_name, dist.version)
    pm.check_pending()
    return pm


class Registry:
    """Name -> component lookup for every family, built from a plugin manager."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._components: dict[str, dict[str, ComponentInfo]] = {f: {} for f in FAMILIES}
        dists: dict[str, tuple[str, str]] = getattr(pm, "_anomaly3d_dists", {})
        for family in FAMILIES:
            hook = getattr(pm.hook, f"anomaly3d_register_{family}")
            for impl in hook.get_hookimpls():
                package, version = dists.get(pm.get_name(impl.plugin) or "", (impl.plugin_name, "?"))
                for cls in impl.function() or []:
                    self._add(ComponentInfo(family, _component_name(cls, package), cls, package, version))

    def _add(self, info: ComponentInfo) -> None:
        known = self._components[info.family]
        if info.name in known:
            other = known[info.name]
            raise PluginError(
                f"duplicate {info.family[:-1]} name '{info.name}': registered by package "
                f"'{other.package}' ({other.cls.__module__}.{other.cls.__qualname__}) and by package "
                f"'{info.package}' ({info.cls.__module__}.{info.cls.__qualname__}); rename one of them"
            )
        known[info.name] = info

    def names(self, family: str) -> list[str]:
        return sorted(self._family(family))

    def infos(self, family: str) -> list[ComponentInfo]:
        return [self._family(family)[n] for n in self.names(family)]

    def info(self, family: str, name: str) -> ComponentInfo:
        components = self._family(family)
        if name not in components:
            raise PluginError(did_you_mean(name, components, what=family[:-1]))
        return components[name]

    def get(self, family: str, name: str) -> Any:
        """Return the class registered as ``name`` in ``family``."""
        return self.info(family, name).cls

    def _family(self, family: str) -> dict[str, ComponentInfo]:
        if family not in self._components:
            raise PluginError(did_you_mean(family, FAMILIES, what="plugin family"))
        return self._components[family]


def _component_name(cls: type, package: str) -> str:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"component class {cls.__qualname__} from package '{package}' has no string 'name'")
    return name


@functools.lru_cache(maxsize=2)
def _cached_registry(autoload: bool) -> Registry:
    return Registry(get_plugin_manager(autoload))


def get_registry(autoload: bool | None = None) -> Registry:
    """The registry of the current environment (discovered once per process and setting)."""
    return _cached_registry(not _autoload_disabled() if autoload is None else autoload)
