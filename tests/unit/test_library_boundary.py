"""The serving library and the services stand alone: nothing in ``pdmesh/`` imports the
benchmarks, the harnesses, the services or the tests, and no service imports a benchmark or a
harness (issue 16: benchmarks and harnesses live beside the library, not in it). Every import
counts here, the lazy ones inside functions too: a lazy import still needs the folder shipped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = ("benchmarks", "harness", "tests")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{path.relative_to(REPO)} imports {module}"
        for path in (REPO / folder).rglob("*.py")
        for module in imported_modules(path)
        if module.split(".")[0] in forbidden
    )


@pytest.mark.parametrize(
    "folder, forbidden", [("pdmesh", (*OUTSIDE, "services")), ("services", OUTSIDE)]
)
def test_no_import_leaves_its_layer(folder: str, forbidden: tuple[str, ...]) -> None:
    assert offending(folder, forbidden) == []


def test_the_library_holds_no_benchmark_or_harness() -> None:
    packages = {p.name for p in (REPO / "pdmesh").iterdir() if p.is_dir()}
    assert not packages & {"bench", "chaos", "testbed"}
    assert not (REPO / "pdmesh" / "launcher.py").exists()
    kv = {p.stem for p in (REPO / "pdmesh" / "kv_transfer").glob("*.py")}
    assert not kv & {"raw_socket", "remote"}
