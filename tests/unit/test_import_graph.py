"""The library's packages import each other without a cycle (``pdmesh.engine`` → ``pdmesh.layers``
← ``pdmesh.models``, never back): read from the source with ``ast``, module-level imports only
(an import inside a function is a deliberate lazy edge, e.g. to keep torch out of a CLI's start)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pdmesh

ROOT = Path(pdmesh.__file__).parent


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pdmesh" and len(parts) > 1 else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()
    # module level, also inside top-level if / try (TYPE_CHECKING blocks count: mypy sees them)
    nodes: list[ast.stmt] = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            nodes.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                nodes.extend(handler.body)
    return found


def package_graph() -> dict[str, dict[str, str]]:
    """package -> {imported package: one module that makes the edge}."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        source = package_of(module)
        if source is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in top_level_imports(tree, module, path.name == "__init__.py"):
            target = package_of(name)
            if target and target != source and (ROOT / target).is_dir():
                graph[source].setdefault(target, module)
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_packages() -> None:
    graph = package_graph()
    cycle = find_cycle(graph)
    if cycle:
        edges = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between packages:\n  " + "\n  ".join(edges))


def test_engine_and_models_share_layers_not_each_other() -> None:
    graph = package_graph()
    assert "layers" in graph["models"] and "layers" in graph["engine"]
    assert "engine" not in graph["models"], graph["models"]
    assert not set(graph.get("layers", {})) & {"engine", "models"}, graph.get("layers")


def test_the_checker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b": "pdmesh.a.x"}, "b": {"a": "pdmesh.b.y"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b": "m"}, "b": {}}) is None
