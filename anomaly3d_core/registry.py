"""Plugin discovery: ``get_plugin_manager()`` and a name -> class :class:`Registry`.

Built-in components live in the ``anomaly3d`` distribution and are found through the same
``anomaly3d`` entry-point group as any third-party package.

One bad package never takes the others down. Each entry point is imported, checked and called on
its own; one that fails to import, misspells a hook, forgets ``@hookimpl``, returns a class
instead of a list or registers a class of the wrong family is set aside as *broken*, with a line
naming the package and the fix (:attr:`Registry.broken`, ``anomaly3d plugins``), and every
command that does not need it keeps working. Two packages registering one name make only that
name ambiguous; ``package:name`` selects one.

Switches: ``ANOMALY3D_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the built-ins;
``ANOMALY3D_DISABLE_PLUGINS=pkg1,pkg2`` (or ``anomaly3d -p no:pkg1``) turns single packages off.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from anomaly3d_core import hookspecs
from anomaly3d_core.errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "anomaly3d"
BUILTIN_DISTRIBUTION = "anomaly3d"
DISABLE_AUTOLOAD_ENV = "ANOMALY3D_DISABLE_PLUGIN_AUTOLOAD"
DISABLE_PLUGINS_ENV = "ANOMALY3D_DISABLE_PLUGINS"
FAMILIES = hookspecs.FAMILIES
HOOK_PREFIX = "anomaly3d_register_"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

log = logging.getLogger("anomaly3d.plugins")


def normalize_package(name: str) -> str:
    """A distribution name as pip compares them (``My_Pkg`` == ``my-pkg``)."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


@dataclass(frozen=True)
class ComponentInfo:
    """One registered component and the package that provided it."""

    family: str
    name: str
    cls: type
    package: str
    version: str

    @property
    def qualified(self) -> str:
        """``package:name``, which selects this component even when another package uses the name."""
        return f"{self.package}:{self.name}"


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point (or one component of it) that was set aside, and why."""

    package: str
    version: str
    entry_point: str
    reason: str
    fix: str
    component: str | None = None

    def line(self) -> str:
        what = f"package '{self.package}' {self.version} (entry point '{self.entry_point}'"
        what += f", component {self.component})" if self.component else ")"
        return (
            f"{what}: {self.reason}; {self.fix} (or turn the package off: "
            f"{DISABLE_PLUGINS_ENV}={self.package} or anomaly3d -p no:{self.package})"
        )


@dataclass
class _Discovery:
    """What loading the entry points found, kept on the plugin manager."""

    dists: dict[str, tuple[str, str]] = field(default_factory=dict)  # plugin name -> (package, version)
    broken: list[BrokenPlugin] = field(default_factory=list)
    disabled: list[tuple[str, str]] = field(default_factory=list)  # (package, version)
    unknown_disabled: list[str] = field(default_factory=list)


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def disabled_packages() -> frozenset[str]:
    """Normalised package names turned off by ``ANOMALY3D_DISABLE_PLUGINS`` (comma or space separated)."""
    raw = os.environ.get(DISABLE_PLUGINS_ENV, "")
    return frozenset(normalize_package(p) for p in re.split(r"[,\s]+", raw) if p.strip())


def _hook_names() -> list[str]:
    return [f"{HOOK_PREFIX}{family}" for family in FAMILIES]


def _static_problems(plugin: Any) -> tuple[str, str] | None:
    """``(reason, fix)`` for a plugin object whose hooks cannot work, checked before registering it."""
    hooks = _hook_names()
    marker = f"{hookspecs.PROJECT}_impl"
    found = False
    for attr in sorted(dir(plugin)):
        if not attr.startswith(f"{hookspecs.PROJECT}_"):
            continue
        value = getattr(plugin, attr, None)
        marked = hasattr(value, marker)
        if attr in hooks:
            if not marked:
                return (
                    f"its function {attr} is not marked with @hookimpl, so it would never be called",
                    "decorate it: `from anomaly3d_core import hookimpl` and put @hookimpl above the def",
                )
            found = True
        elif marked or attr.startswith(HOOK_PREFIX):
            return (
                f"it implements an unknown hook '{attr}'",
                did_you_mean(attr, hooks, what="hook").replace(f"unknown hook '{attr}'; ", "rename it; "),
            )
    if not found:
        return (
            "it implements no anomaly3d hook",
            f"define one of {', '.join(hooks)} with @hookimpl in the module the entry point names",
        )
    return None


def get_plugin_manager(
    autoload: bool | None = None, disabled: Iterable[str] | None = None
) -> pluggy.PluginManager:
    """A plugin manager with every usable ``anomaly3d`` entry point registered.

    ``autoload=False`` (or ``ANOMALY3D_DISABLE_PLUGIN_AUTOLOAD``) keeps third-party packages out;
    ``disabled`` (default: ``ANOMALY3D_DISABLE_PLUGINS``) names packages to skip. The built-ins are
    always loaded, through their entry points. Entry points that cannot work are not registered;
    they are listed, with the reason, in :class:`Registry`'s ``broken``.
    """
    if autoload is None:
        autoload = not _autoload_disabled()
    off = {normalize_package(p) for p in (disabled_packages() if disabled is None else disabled)}
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    found = _Discovery()
    pm._anomaly3d = found
    pm._anomaly3d_dists = found.dists  # kept for callers of the earlier attribute
    seen_packages: set[str] = set()
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["name"] or "?"
        builtin = dist_name == BUILTIN_DISTRIBUTION
        if not autoload and not builtin:
            continue
        eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        if not eps:
            continue
        key = normalize_package(dist_name)
        if key in off and not builtin:
            if key not in seen_packages:
                found.disabled.append((dist_name, dist.version))
            seen_packages.add(key)
            continue
        seen_packages.add(key)
        for ep in eps:
            plugin_name = f"{dist_name}:{ep.name}"
            if pm.has_plugin(plugin_name) or any(
                b.package == dist_name and b.entry_point == ep.name for b in found.broken
            ):
                continue  # the same distribution seen twice on sys.path
            _load_entry_point(pm, found, ep, dist_name, dist.version, plugin_name)
    found.unknown_disabled = sorted(off - seen_packages - {normalize_package(BUILTIN_DISTRIBUTION)})
    if normalize_package(BUILTIN_DISTRIBUTION) in off:
        log.warning(
            "%s names the built-in package '%s', which cannot be turned off; %s=1 loads only the built-ins",
            DISABLE_PLUGINS_ENV,
            BUILTIN_DISTRIBUTION,
            DISABLE_AUTOLOAD_ENV,
        )
    pm.check_pending()  # every registered plugin passed the per-plugin checks, so this cannot fail
    return pm


IMPORT_TIMEOUT_ENV = "ANOMALY3D_PLUGIN_IMPORT_TIMEOUT"  # seconds a plugin package may take to import
exit_on_hang = False  # the command line sets it: a hung import then ends the command with its message


@contextlib.contextmanager
def _import_watchdog(package: str, target: str) -> Iterator[None]:
    """Name a plugin package whose import has not finished after the timeout (an import cannot be
    interrupted): a warning, and on the command line exit status 2 instead of hanging for ever."""
    try:
        timeout = float(os.environ.get(IMPORT_TIMEOUT_ENV) or 30)
    except ValueError:
        timeout = 30.0

    def expired() -> None:
        message = (
            f"anomaly3d: plugin package '{package}' has not finished importing '{target}' after {timeout:g} s "
            f"({IMPORT_TIMEOUT_ENV}); it may hang: turn it off with {DISABLE_PLUGINS_ENV}={package} "
            f"(or anomaly3d -p no:{package})"
        )
        if exit_on_hang:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(2)
        log.warning(message)

    timer = threading.Timer(timeout, expired)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _load_entry_point(
    pm: pluggy.PluginManager, found: _Discovery, ep: Any, dist_name: str, version: str, plugin_name: str
) -> None:
    def broken(reason: str, fix: str) -> None:
        found.broken.append(BrokenPlugin(dist_name, version, ep.name, reason, fix))

    try:
        with (
            contextlib.nullcontext()
            if dist_name == BUILTIN_DISTRIBUTION
            else _import_watchdog(dist_name, ep.value)
        ):
            plugin = ep.load()
    except (Exception, SystemExit) as exc:  # whatever a broken package raises on import
        text = " ".join(str(exc).split())
        broken(
            f"it fails to import '{ep.value}' ({type(exc).__name__}{': ' + text if text else ''})",
            f"fix the import error or reinstall the package (pip install --force-reinstall {dist_name})",
        )
        return
    problem = _static_problems(plugin)
    if problem:
        broken(*problem)
        return
    try:
        pm.register(plugin, name=plugin_name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        text = " ".join(str(exc).split())
        broken(f"its hooks do not match the hook specifications ({text})", "hooks take no arguments")
        return
    found.dists[plugin_name] = (dist_name, version)


class Registry:
    """Name -> component lookup for every family, built from a plugin manager.

    ``preferred`` maps ``(family, name)`` to the package to use when the name is registered by
    several packages (a saved model's provenance, so it keeps loading after a clash appears).
    """

    def __init__(
        self, pm: pluggy.PluginManager, preferred: Mapping[tuple[str, str], str] | None = None
    ) -> None:
        from pydantic import BaseModel

        from anomaly3d_core.interfaces import FAMILY_BASES, api_version_problem, family_of

        self.pm = pm
        found: _Discovery = getattr(pm, "_anomaly3d", None) or _Discovery(
            dists=dict(getattr(pm, "_anomaly3d_dists", {}))
        )
        self.broken: list[BrokenPlugin] = list(found.broken)
        self.disabled: list[tuple[str, str]] = list(found.disabled)
        self.unknown_disabled: list[str] = list(found.unknown_disabled)
        self.deprecations: list[str] = []
        self.preferred = dict(preferred or {})
        self._components: dict[str, dict[str, list[ComponentInfo]]] = {f: {} for f in FAMILIES}
        for family in FAMILIES:
            hook_name = f"{HOOK_PREFIX}{family}"
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                plugin_name = pm.get_name(impl.plugin) or impl.plugin_name
                package, version = found.dists.get(plugin_name, (impl.plugin_name, "?"))
                entry = plugin_name.split(":", 1)[1] if plugin_name.startswith(f"{package}:") else plugin_name

                def broken(reason: str, fix: str, component: str | None = None) -> None:
                    self.broken.append(BrokenPlugin(package, version, entry, reason, fix, component))  # noqa: B023

                try:
                    result = impl.function()
                except Exception as exc:
                    text = " ".join(str(exc).split())
                    broken(
                        f"{hook_name}() raised {type(exc).__name__}{': ' + text if text else ''}",
                        "fix the hook so it returns a list of component classes",
                    )
                    continue
                if result is None:
                    continue
                if isinstance(result, type):
                    broken(
                        f"{hook_name}() returns the class {result.__qualname__} instead of a list",
                        f"return [{result.__qualname__}]",
                    )
                    continue
                if not isinstance(result, list | tuple):
                    broken(
                        f"{hook_name}() returns {type(result).__name__}, not a list of classes",
                        "return a list of component classes",
                    )
                    continue
                base = FAMILY_BASES[family]
                for cls in result:
                    label = getattr(cls, "__qualname__", repr(cls))
                    if not isinstance(cls, type):
                        broken(
                            f"{hook_name}() returns {cls!r}, which is not a class",
                            "return the classes themselves, not instances",
                        )
                        continue
                    if not issubclass(cls, base):
                        other = family_of(cls)
                        if other:
                            broken(
                                f"{hook_name}() returns {label}, a {base_label(FAMILY_BASES[other])} "
                                f"(family '{other}'), not a {base_label(base)}",
                                f"return it from {HOOK_PREFIX}{other} instead",
                                label,
                            )
                        else:
                            broken(
                                f"{hook_name}() returns {label}, which does not subclass "
                                f"anomaly3d_core.interfaces.{base.__name__}",
                                f"derive it from anomaly3d_core.interfaces.{base.__name__}",
                                label,
                            )
                        continue
                    name = getattr(cls, "name", None)
                    if not isinstance(name, str) or not _NAME.fullmatch(name):
                        broken(
                            f"{label} has no valid name (got {name!r})",
                            "set a class attribute name = 'my_name' (letters, digits, _ . -; no ':' or spaces)",
                            label,
                        )
                        continue
                    params = getattr(cls, "Params", None)
                    if not (isinstance(params, type) and issubclass(params, BaseModel)):
                        broken(
                            f"{label} ('{name}') has no pydantic Params model (got {params!r})",
                            "set Params to a subclass of anomaly3d_core.interfaces.Params",
                            label,
                        )
                        continue
                    abstract = _abstract_methods(cls)
                    if abstract:
                        broken(
                            f"{label} ('{name}') leaves abstract methods unimplemented: {', '.join(abstract)}",
                            "implement them",
                            label,
                        )
                        continue
                    problem = api_version_problem(cls)
                    if problem and problem[0] == "error":
                        broken(
                            f"{label} ('{name}') is {problem[1]}", "see the package's documentation", label
                        )
                        continue
                    if problem:
                        self.deprecations.append(
                            f"package '{package}' {version}: {label} ('{name}') is {problem[1]}"
                        )
                    info = ComponentInfo(family, name, cls, package, version)
                    self._components[family].setdefault(name, []).append(info)

    # ------------------------------------------------------------------ lookups
    def names(self, family: str) -> list[str]:
        """Every registered name (each once, also when several packages register it)."""
        return sorted(self._family(family))

    def infos(self, family: str) -> list[ComponentInfo]:
        """Every registered component, clashing ones included, by name then package."""
        fam = self._family(family)
        return [info for name in sorted(fam) for info in sorted(fam[name], key=lambda i: i.package)]

    def clashes(self, family: str) -> dict[str, list[ComponentInfo]]:
        """Names registered by more than one package."""
        return {n: infos for n, infos in self._family(family).items() if len(infos) > 1}

    def info(self, family: str, name: str) -> ComponentInfo:
        """The component ``name`` (or ``package:name``) of ``family``."""
        components = self._family(family)
        if ":" in name:
            package, _, short = name.partition(":")
            for info in components.get(short, []):
                if normalize_package(info.package) == normalize_package(package):
                    return info
            qualified = [i.qualified for infos in components.values() for i in infos]
            raise PluginError(did_you_mean(name, qualified, what=family[:-1]) + self._broken_hint())
        if name not in components:
            raise PluginError(did_you_mean(name, components, what=family[:-1]) + self._broken_hint())
        infos = components[name]
        if len(infos) == 1:
            return infos[0]
        pinned = self.preferred.get((family, name))
        for info in infos:
            if pinned and normalize_package(info.package) == normalize_package(pinned):
                return info
        packages = ", ".join(f"'{i.package}' ({i.cls.__module__}.{i.cls.__qualname__})" for i in infos)
        choices = " or ".join(f"'{i.qualified}'" for i in infos)
        others = [i.package for i in infos if i.package != BUILTIN_DISTRIBUTION]
        raise PluginError(
            f"duplicate {family[:-1]} name '{name}': registered by packages {packages}; "
            f"write {choices} to choose one, or turn one package off "
            f"({DISABLE_PLUGINS_ENV}={others[-1] if others else infos[-1].package})"
        )

    def get(self, family: str, name: str) -> Any:
        """Return the class registered as ``name`` (or ``package:name``) in ``family``."""
        return self.info(family, name).cls

    def with_preferences(self, preferred: Mapping[tuple[str, str], str]) -> Registry:
        """This registry, resolving the given clashing names to the given packages."""
        view = object.__new__(Registry)
        view.__dict__.update(self.__dict__)
        view.preferred = {**self.preferred, **preferred}
        return view

    def package_state(self, package: str) -> str | None:
        """Why an installed package provides nothing here: ``'disabled'``, a broken reason, or ``None``."""
        key = normalize_package(package)
        if any(normalize_package(p) == key for p, _ in self.disabled):
            return "disabled"
        reasons = [b.line() for b in self.broken if normalize_package(b.package) == key]
        return "; ".join(reasons) if reasons else None

    def _family(self, family: str) -> dict[str, list[ComponentInfo]]:
        if family not in self._components:
            raise PluginError(did_you_mean(family, FAMILIES, what="plugin family"))
        return self._components[family]

    def _broken_hint(self) -> str:
        if not self.broken:
            return ""
        packages = sorted({b.package for b in self.broken})
        return (
            f" (broken plugin packages that may provide it: {', '.join(packages)}; see `anomaly3d plugins`)"
        )


def base_label(base: type) -> str:
    """``FeatureExtractor`` -> ``feature extractor``: a family's base class in words."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", base.__name__).lower()


def _abstract_methods(cls: type) -> list[str]:
    names = getattr(cls, "__abstractmethods__", None)
    if names is None:  # torch modules do not use ABCMeta: look at the methods themselves
        names = [n for n in dir(cls) if getattr(getattr(cls, n, None), "__isabstractmethod__", False)]
    return sorted(names)


@functools.lru_cache(maxsize=8)
def _cached_registry(autoload: bool, disabled: frozenset[str]) -> Registry:
    return Registry(get_plugin_manager(autoload, disabled))


_warned: set[str] = set()


def get_registry(autoload: bool | None = None, *, warn: bool = True) -> Registry:
    """The registry of the current environment (discovered once per process and setting).

    Broken packages, deprecated contract versions and unknown names in
    ``ANOMALY3D_DISABLE_PLUGINS`` are logged once as warnings (``warn=False`` leaves that to the caller).
    """
    reg = _cached_registry(not _autoload_disabled() if autoload is None else autoload, disabled_packages())
    if warn:
        lines = [f"plugin {b.line()}; skipped, everything else works" for b in reg.broken]
        lines += [f"plugin {d}" for d in reg.deprecations]
        lines += [
            f"{DISABLE_PLUGINS_ENV} names '{p}', which is not an installed plugin package"
            for p in reg.unknown_disabled
        ]
        for line in lines:
            if line not in _warned:
                _warned.add(line)
                log.warning(line)
    return reg
