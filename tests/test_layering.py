"""The layering the README promises, read from the code's own imports: the core imports torch
and the standard library only, Prefect is imported only by the orchestration part, and the
project's modules import each other without a cycle at import time."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lru_online", "features", "flows", "bench", "infra")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                found[_module_name(path)] = path
    return found


def test_the_core_imports_torch_and_the_standard_library_only():
    allowed = {"torch", "triton", "lru_online", "_cscan", *sys.stdlib_module_names}
    outside = {
        f"{name}: {imported}"
        for name, path in _modules().items()
        if name.startswith("lru_online")
        for imported in _imports(path, top_level_only=False)
        if imported.split(".")[0] not in allowed
    }
    assert not outside, sorted(outside)


def test_prefect_is_imported_by_the_orchestration_part_only():
    importers = {
        name
        for name, path in _modules().items()
        if any(imported.split(".")[0] == "prefect" for imported in _imports(path, top_level_only=False))
    }
    assert importers and all(name.startswith("flows.orchestrate") for name in importers), sorted(importers)


def test_no_import_cycle_between_the_project_modules():
    modules = _modules()
    graph = {
        name: {imported for imported in _imports(path, top_level_only=True) if imported in modules and imported != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own modules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {other for other in graph[name] if not name.startswith(other + ".")}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                cycles.append(trail[trail.index(other) :] + [other])
            elif other not in state:
                visit(other, [*trail, other])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
