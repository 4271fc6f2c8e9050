"""The house has floors (docs/architecture.md): imports only go down or sideways, never up, and never round in a
circle. Read from the source with `ast`, so a lazy import inside a function counts like any other."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Floors from the ground up; a module may import its own floor and the floors below it. `codeclm.testing` (the
# loopback servers tests run against) sits beside the house: it may use the floors below `checks`, and nothing
# in the product imports it.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("codeclm", "codeclm.errors", "codeclm.settings", "codeclm.records", "codeclm.baseline_records",
     "codeclm.benchmarks", "codeclm.storage", "codeclm.publish", "codeclm.rouge", "codeclm.profile",
     "codeclm.profile_charts", "codeclm.profile_show"),
    ("codeclm.ops",),
    ("codeclm.llm",),
    ("codeclm.eval", "codeclm.train"),
    ("codeclm.checks", "codeclm.results"),
    ("tasks",),
    ("flows",),
    ("codeclm.cli",),
)
TESTING = "codeclm.testing"


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("codeclm", "tasks", "flows"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The project modules a file imports (`from a.b import c` counts as a.b.c when that is a module)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in candidates:
            if name in known:
                yield name
                break


def _floor(module: str) -> int:
    """The floor of a module: the longest prefix listed in FLOORS."""
    best, depth = -1, -1
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "codeclm"  # the package root is only itself
            if (module == prefix or inside) and len(prefix) > depth:
                best, depth = level, len(prefix)
    assert best >= 0, f"{module} is on no floor: add it to FLOORS and docs/architecture.md"
    return best


GRAPH = {name: set(_imports(path, _modules())) - {name} for name, path in _modules().items()}


def test_every_import_goes_down_or_sideways() -> None:
    checks = _floor("codeclm.checks")
    upward = []
    for module, targets in GRAPH.items():
        for target in targets:
            if target.startswith(TESTING):
                if not module.startswith(TESTING):
                    upward.append(f"{module} -> {target} (test support in the product)")
            elif module.startswith(TESTING):
                if _floor(target) >= checks:
                    upward.append(f"{module} -> {target}")
            elif _floor(target) > _floor(module):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_circles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                circles.append([v, *component])

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert circles == []


def test_the_floors_are_seen_by_the_test() -> None:
    """The two checks above are not vacuous: they see the package's modules and their imports."""
    assert {"codeclm.llm.gateway", "codeclm.eval.crr", "tasks.rounds", "flows.generate", "codeclm.cli"} <= set(GRAPH)
    assert "codeclm.llm.gateway" in GRAPH["tasks._base"] and "flows.generate" in GRAPH["codeclm.cli"]
    assert _floor("codeclm.llm.gateway") < _floor("tasks.rounds") < _floor("flows.generate") < _floor("codeclm.cli")
