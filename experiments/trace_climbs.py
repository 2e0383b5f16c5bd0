"""Follow one input of ``anomaly3d score`` through the code: which modules it passes and how often a
call climbs back up the layers (a lower layer calling into a higher one).

    python experiments/trace_climbs.py --model MODEL_DIR --input SCAN [--out DIR]

Every Python call inside ``anomaly3d_core`` while the command runs is traced (``sys.setprofile``);
a call's caller is the nearest ``anomaly3d_core`` frame below it (the standard library and
importlib are transparent, so an import counts as a call); calls from plugins and callbacks handed
down (lambdas, nested functions) are not the caller's own climbs.
Layers, lowest first: foundation (errors, config, registry, interfaces, progress) < ``io`` <
``preprocess`` < ``model`` < ``postprocess`` < ``evaluation`` < detectors (``detector``, ``pipeline``,
``ensemble``, ``persistence``, ``provenance``, ``scores``, ``tracking``) < flows (``runner``,
``engine``) < ``mlops`` < the command line. A climb is a caller→callee module pair whose callee sits
on a higher layer; each pair counts once. Run it on two checkouts (``PYTHONPATH=...``) to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

LAYERS = (
    ("errors", "safe_yaml", "progress", "hookspecs", "interfaces", "registry", "config", "config_tree"),
    ("io",),
    ("preprocess",),
    ("model",),
    ("postprocess",),
    ("evaluation",),
    ("detector", "pipeline", "ensemble", "persistence", "provenance", "scores", "tracking", "seed_api"),
    ("runner", "engine"),
    ("mlops",),
    ("cli", "cli_parser", "cli_common", "cli_demo", "cli_plugins", "__main__"),
)


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    return -1  # demo data, the package root: not on a layer


def trace(argv: list[str]) -> dict:
    modules: list[str] = []
    edges: set[tuple[str, str]] = set()

    def profile(frame, event, arg):  # noqa: ANN001, ANN202
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith("anomaly3d_core"):
            return
        if callee not in modules:
            modules.append(callee)
        code = frame.f_code
        if code.co_name == "<lambda>" or "<locals>" in code.co_qualname:
            return  # a callback handed down (a writer, a progress hook): the caller asked for it
        caller_frame = frame.f_back
        while caller_frame is not None and not caller_frame.f_globals.get("__name__", "").startswith(
            ("anomaly3d_core", "anomaly3d_plugins")
        ):
            caller_frame = caller_frame.f_back  # importlib, the standard library, numpy: transparent
        if caller_frame is not None and caller_frame.f_globals["__name__"].startswith("anomaly3d_core"):
            caller = caller_frame.f_globals["__name__"]
            if caller != callee:
                edges.add((caller, callee))

    from anomaly3d_core.cli import main

    sys.setprofile(profile)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)
    climbs = sorted((a, b) for a, b in edges if layer(a) >= 0 and layer(b) >= 0 and layer(b) > layer(a))
    return {
        "exit_code": code,
        "modules": modules,
        "n_modules": len(modules),
        "climbs": climbs,
        "n_climbs": len(climbs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, help="one scan")
    parser.add_argument("--out", type=Path, help="write climbs.json here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = trace(["score", "--model", args.model, "--input", args.input, "--out", tmp])
    import anomaly3d_core

    found["code"] = str(Path(anomaly3d_core.__file__).parent)
    print(f"{found['n_modules']} modules, {found['n_climbs']} climbs ({found['code']})")
    for a, b in found["climbs"]:
        print(f"  {a} -> {b}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "climbs.json").write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
