"""The import graph of callscribe, read from the source (every import: top level, inside
functions and under TYPE_CHECKING alike), has no cycle, and the web layer never reaches the
composition root (`callscribe.service`), which is what assembles it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "callscribe"
Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """The callscribe modules `module` imports: `import a.b`, `from a import b` (a module b
    or a name in a), relative imports resolved against the module's package."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}"


def import_graph(root: Path = PACKAGE_DIR) -> Graph:
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = imported_modules(tree, module, path.name == "__init__.py", known)
        graph[module] = {target for target in targets if target in known and target != module}
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS with three colours)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            target = next(stack[-1], None)
            if target is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
                continue
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                path.append(target)
                on_path.add(target)
                stack.append(iter(sorted(graph[target])))
    return None


def reach(graph: Graph, start: str, goal: str) -> list[str] | None:
    """An import path from `start` to `goal`, or None."""
    previous: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        module = frontier.pop()
        if module == goal:
            path = [goal]
            while path[-1] != start:
                path.append(previous[path[-1]])
            return path[::-1]
        for target in sorted(graph[module]):
            if target not in seen:
                seen.add(target)
                previous[target] = module
                frontier.append(target)
    return None


def test_the_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    # Guards the checks below against a graph that is silently empty or misses kinds of import.
    assert "callscribe.service" in graph["callscribe.cli"]  # imported inside a function
    assert "callscribe.calls" in graph["callscribe.service"]
    assert "callscribe.web.app" in graph["callscribe.web.whip"]


def test_callscribe_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_web_layer_never_imports_the_service() -> None:
    graph = import_graph()
    paths = [
        reach(graph, module, "callscribe.service") for module in graph if module.startswith("callscribe.web")
    ]
    found = [" -> ".join(path) for path in paths if path is not None]
    assert not found, "callscribe.web reaches callscribe.service: " + "; ".join(found)


def test_the_checks_catch_a_cycle_and_a_web_import(tmp_path: Path) -> None:
    package = tmp_path / "callscribe"
    (package / "web").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "web" / "__init__.py").write_text("")
    (package / "service.py").write_text("from callscribe.web import app\n")
    (package / "web" / "app.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from callscribe.service import Service\n"
    )
    (package / "a.py").write_text("def f():\n    from . import b\n")
    (package / "b.py").write_text("from callscribe import a\n")
    graph = import_graph(package)
    assert find_cycle(graph) in (
        ["callscribe.a", "callscribe.b", "callscribe.a"],
        ["callscribe.service", "callscribe.web.app", "callscribe.service"],
    )
    assert reach(graph, "callscribe.web.app", "callscribe.service") == [
        "callscribe.web.app",
        "callscribe.service",
    ]
    del graph["callscribe.service"], graph["callscribe.web.app"]
    graph = {
        module: targets - {"callscribe.service", "callscribe.web.app"} for module, targets in graph.items()
    }
    assert find_cycle(graph) == ["callscribe.a", "callscribe.b", "callscribe.a"]
