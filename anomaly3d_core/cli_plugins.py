"""``anomaly3d plugins``: every discovered component by family, with package and version."""

from __future__ import annotations

import argparse
from typing import Any

from anomaly3d_core.cli_common import EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from anomaly3d_core.registry import DISABLE_PLUGINS_ENV, FAMILIES, get_registry

    reg = get_registry(warn=False)  # broken packages are listed below, not warned about
    for family in FAMILIES:
        print(f"{family}:")
        clashes = reg.clashes(family)
        infos = reg.infos(family)
        names = [info.qualified if info.name in clashes else info.name for info in infos]
        width = max([14, *(len(n) + 2 for n in names)])  # a long name never runs into the package
        for info, name in zip(infos, names, strict=True):
            source = f"{info.package} {info.version}"
            print(
                f"  {name:<{width}}{source:<{max(24, len(source) + 2)}}{info.cls.__module__}.{info.cls.__qualname__}"
            )
            if args.verbose:
                for line in _component_details(info.cls):
                    print(f"      {line}")
    clashing = [(f, n, infos) for f in FAMILIES for n, infos in reg.clashes(f).items()]
    if clashing:
        print("\nname clashes (write package:name to choose one):")
        for family, name, infos in clashing:
            print(f"  {family[:-1]} '{name}': " + ", ".join(i.qualified for i in infos))
    if reg.broken:
        print("\nbroken plugin packages (skipped; everything else works):")
        for broken in reg.broken:
            print(f"  {broken.line()}")
    if reg.disabled or reg.unknown_disabled:
        print(f"\nturned off ({DISABLE_PLUGINS_ENV} or -p no:PACKAGE):")
        for package, version in reg.disabled:
            print(f"  {package} {version}")
        for package in reg.unknown_disabled:
            print(f"  {package} (not an installed plugin package)")
    for line in reg.deprecations:
        print(f"\ndeprecated: {line}")
    return EXIT_OK


def _component_details(cls: Any) -> list[str]:
    """One line per contract attribute and per parameter (type, default, description) of ``cls``."""
    from anomaly3d_core.interfaces import Autoencoder, FeatureExtractor, ThresholdMethod, VolumeLoader

    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [doc[0]] if doc and cls.__doc__ not in {c.__doc__ for c in cls.__mro__[1:]} else []
    if issubclass(cls, FeatureExtractor):
        lines.append(
            f"layers: {', '.join(cls.layers)} (default: {', '.join(cls.default_layers) or 'none'})"
            if cls.layers
            else "layers: set from the parameters"
        )
    elif issubclass(cls, Autoencoder):
        lines.append(
            "fitted by "
            + ("the gradient loop" if cls.trainable else "fit_closed_form (no gradient loop)")
            + ("" if cls.per_feature_residual else "; one score per patch")
        )
    elif issubclass(cls, ThresholdMethod):
        lines.append(f"calibration: {cls.calibration}")
    elif issubclass(cls, VolumeLoader):
        what = ", ".join(cls.extensions) or "no extension"
        lines.append(f"reads: {what}" + (", folders" if cls.reads_directories else ""))
    fields = cls.Params.model_fields
    if not fields:
        lines.append("parameters: none")
    for name, field in fields.items():
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = f"default {value!r}"
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"{name}: {_type_name(field.annotation)}, {default}{desc}")
    return lines


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")
