"""The layers of docs/ARCHITECTURE.md, checked on the code: no import cycle, imports only point
down, and generic code names no method.

Every import counts, lazy ones inside functions included (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods", "datasets")
# The foundation: small modules every layer may use; they import no project module.
FOUNDATION = {"bench.errors", "bench.util", "bench.stats", "bench.spec", "bench.records",
              "bench.environment"}
# Which modules a module of each layer may import (besides the foundation and its own package).
MAY_IMPORT = {
    "datasets": set(),
    "methods": {"datasets"},
}
# Worker-side modules must not reach the driver's side.
DRIVER_SIDE = {"bench.driver", "bench.twins", "bench.tracking", "bench.report", "bench.figures",
               "bench.regress", "bench.commands", "bench.cli"}
WORKER_SIDE = {"bench.worker", "bench.executors"}


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_of(p) for p in files}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for path in files:
        me = _module_of(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name)
                # "import methods" from inside methods/ is the package itself, not a layer jump.
                if target and target != me and not me.startswith(target + "."):
                    deps.add(target)
        graph[me] = deps
    return graph


GRAPH = _import_graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_modules_it_should():
    # A check that parsed nothing would pass everything.
    assert {"bench.worker", "bench.driver", "methods.rd", "datasets.splits"} <= set(GRAPH)
    assert "bench.worker" in GRAPH["bench.driver"] and "methods.base" in GRAPH["methods.rd"]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_foundation_imports_no_project_module():
    for module in FOUNDATION:
        assert GRAPH[module] == set(), f"{module} imports {sorted(GRAPH[module])}"


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_lower_layers_do_not_import_upper_ones(package):
    allowed = FOUNDATION | MAY_IMPORT[package]
    for module, deps in GRAPH.items():
        if module.split(".")[0] != package:
            continue
        outside = {d for d in deps if d.split(".")[0] != package}
        bad = {d for d in outside if d not in allowed and d.split(".")[0] not in allowed}
        assert not bad, f"{module} imports {sorted(bad)}, above its layer"


def test_workers_do_not_reach_the_driver_side():
    for module in WORKER_SIDE:
        bad = {d for d in GRAPH[module] if d in DRIVER_SIDE or d.startswith("bench.commands")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_generic_code_names_no_method():
    """String literals of bench/ (docstrings and the paper's own data aside) never equal a
    registered method or variant name: methods speak for themselves through their class."""
    import methods

    names = set(methods.available_methods()) | {v.name for v in methods.available_variants()}
    offenders = []
    for path in (ROOT / "bench").rglob("*.py"):
        if path.name == "paper.py":  # the paper's tables name the paper's methods
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                        ast.Constant):
                    docstrings.add(id(body[0].value))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings and node.value in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert offenders == []
