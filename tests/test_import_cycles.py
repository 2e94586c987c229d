"""No import cycles among evomerge's lower layers, counting every import: module level, inside
functions and under TYPE_CHECKING (import-linter's layers contract does not see cycles inside one
layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import evomerge

ROOT = Path(evomerge.__file__).resolve().parent
CHECKED = ("core", "models", "methods", "recipes", "merge")


def _module_names() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ("evomerge", *f.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _module_names()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("evomerge")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if base.startswith("evomerge"):
                    deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base)
                             for a in node.names}
        graph[name] = deps - {name, "evomerge"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_below_evaluation():
    graph = import_graph()
    assert "evomerge.merge.plan" in graph["evomerge.merge.card"]  # function/TYPE_CHECKING seen
    lower = {m: {d for d in deps if d.split(".")[1] in CHECKED}
             for m, deps in graph.items() if m.count(".") and m.split(".")[1] in CHECKED}
    assert cycles(lower) == []
