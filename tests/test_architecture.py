"""Layering checks: the package has no import cycle, and detectors are used through their public surface."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "anomaly3d_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every anomaly3d_core module imported anywhere in ``path`` (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "anomaly3d_core":  # the package root only re-exports lazily
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {p: _module_name(p) for p in ROOT.rglob("*.py")}
    modules = set(files.values())
    return {name: _imports(path, modules) - {name} for path, name in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "anomaly3d_core.detector" in graph and "anomaly3d_core.persistence" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_core_never_imports_the_builtin_plugins():
    offenders = [str(p) for p in ROOT.rglob("*.py") if "anomaly3d_plugins" in p.read_text(encoding="utf-8")]
    assert offenders == []


@pytest.mark.parametrize(
    "module",
    [
        "ensemble.py",
        "mlops/tuning.py",
        "mlops/serving.py",
        "mlops/pyfunc_model.py",
        "runner.py",
        "evaluator.py",
        "engine.py",
        "cli.py",
    ],
)
def test_detector_users_call_no_private_method(module):
    text = (ROOT / module).read_text(encoding="utf-8")
    calls = re.findall(r"\b(?!self\b|cls\b)([a-z_]\w*)\._[a-z]\w*\(", text)
    assert calls == [], f"{module} calls private methods on {calls}"


def test_public_namespace():
    import anomaly3d_core
    from anomaly3d_core import AnomalyDetectionPipeline, Detector, EnsemblePipeline, comprehensive_evaluation

    assert issubclass(AnomalyDetectionPipeline, Detector) and issubclass(EnsemblePipeline, Detector)
    assert callable(comprehensive_evaluation)
    for name in anomaly3d_core.__all__:
        assert getattr(anomaly3d_core, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        anomaly3d_core.nope  # noqa: B018


# The core: the engine, the detectors and the stages. It records through the injected Tracker
# (anomaly3d_core.tracking) and never reaches up into mlops/ (MLflow, Optuna, serving, Spark).
CORE_MODULES = (
    "anomaly3d_core.engine",
    "anomaly3d_core.tracking",
    "anomaly3d_core.detector",
    "anomaly3d_core.pipeline",
    "anomaly3d_core.ensemble",
    "anomaly3d_core.persistence",
    "anomaly3d_core.provenance",
    "anomaly3d_core.runner",
    "anomaly3d_core.evaluator",
    "anomaly3d_core.scores",
    "anomaly3d_core.synthetic",
)
CORE_PACKAGES = ("io", "preprocess", "model", "postprocess", "evaluation")
MAX_MODULE_LINES = 500


def _core(graph: dict[str, set[str]]) -> list[str]:
    packages = tuple(f"anomaly3d_core.{p}" for p in CORE_PACKAGES)
    return sorted(m for m in graph if m in CORE_MODULES or m.startswith(packages))


def test_core_never_imports_mlops_or_the_command_line():
    graph = import_graph()
    core = _core(graph)
    assert set(CORE_MODULES) <= set(core) and "anomaly3d_core.io.files" in core
    seen: dict[str, str] = {}  # module -> the core module through which it is reached
    todo = [(m, m) for m in core]
    while todo:
        module, via = todo.pop()
        for nxt in graph.get(module, ()):
            if nxt not in seen:
                seen[nxt] = via
                todo.append((nxt, via))
    upward = {m: v for m, v in seen.items() if m.startswith(("anomaly3d_core.mlops", "anomaly3d_core.cli"))}
    assert upward == {}, f"core modules reach up (module: through): {upward}"


def test_core_never_imports_mlflow_or_optuna():
    graph = import_graph()
    offenders = []
    for path in ROOT.rglob("*.py"):
        if _module_name(path) not in _core(graph):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("mlflow", "optuna")]
    assert offenders == []


def test_no_module_over_500_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.rglob("*.py")
    }
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}
    assert sizes["cli.py"] <= 300, "cli.py only parses arguments, calls the engine and prints"


def test_ensembles_are_asked_through_the_detector_surface():
    """``detector.is_ensemble`` / ``reference()``, never duck typing on a ``members`` attribute."""
    duck = re.compile(r"(hasattr|getattr)\([^)]*[\"']members[\"']")
    assert [
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if duck.search(p.read_text(encoding="utf-8"))
    ] == []


def test_one_score_input_climbs_the_layers_at_most_5_times(saved_model, demo_dir, tmp_path):
    """Following one input of ``anomaly3d score`` from the command line to the written map, calls
    (imports included) go down the layers; experiments/trace_climbs.py says how it is counted."""
    sys.path.insert(0, str(ROOT.parent / "experiments"))
    try:
        from trace_climbs import trace
    finally:
        sys.path.remove(str(ROOT.parent / "experiments"))
    scan = sorted((demo_dir / "test").glob("*.nii.gz"))[0]
    found = trace(["score", "--model", str(saved_model), "--input", str(scan), "--out", str(tmp_path)])
    assert found["exit_code"] == 0 and (tmp_path / "scores.csv").is_file()
    assert found["n_climbs"] <= 5, found["climbs"]
