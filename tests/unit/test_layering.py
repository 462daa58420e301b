"""The layering of ``pdmesh`` (the library) and ``services`` (the processes), read from the
source with ``ast`` (module-level imports only: an import inside a function is a deliberate lazy
edge):

- no import cycle between packages (``pdmesh.<package>``, ``services.<service>``);
- no service imports another service's internals: what services share is ``services.mesh``
  and the SGLang protocol adapter ``services.sglang_grpc``, and the alias packages ``services.decode`` / ``services.prefill`` may run ``services.worker``;
- proto types (``pdmesh.v1``, ``pdmesh.sglang``) stop at the service edge: inside ``pdmesh``
  only the modules that are edges by name import them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.unit.test_import_graph import find_cycle, top_level_imports

REPO = Path(__file__).resolve().parents[2]
TREES = ("pdmesh", "services")
GENERATED = ("pdmesh.v1", "pdmesh.sglang")  # the gRPC stubs (scripts/gen_protos.sh)
SHARED_SERVICE_MODULES = (
    "services.mesh",
    # SGLang's scheduler protocol: an adapter, not a service (no __main__); the worker serves it
    # and the router's worker client speaks it
    "services.sglang_grpc",
)
# alias package -> the service it runs
ALIASES = {"services.decode": "services.worker", "services.prefill": "services.worker"}
# modules of pdmesh that are a gRPC edge by what they are, with why
PROTO_EDGES = {
    # maps exceptions to gRPC status codes and puts typed details (common.proto) on them
    "pdmesh.rpc.errors": "the status details every service's errors carry",
    # the grpc KV transfer backend is itself a gRPC service (KVReceiverService)
    "pdmesh.kv_transfer.grpc_backend": "a KV transfer backend that speaks gRPC",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def under(module: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def imports_of(path: Path) -> set[str]:
    """The modules ``path`` imports at module level (also inside top-level if / try)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return top_level_imports(tree, module_name(path), path.name == "__init__.py")


def modules() -> dict[str, set[str]]:
    """Every module of the two trees but the generated stubs -> its imports within the two
    trees (benchmarks/ and harness/ are outside them: tests/unit/test_library_boundary.py)."""
    found = {}
    for tree in TREES:
        for path in sorted((REPO / tree).rglob("*.py")):
            name = module_name(path)
            if under(name, GENERATED):
                continue
            found[name] = {m for m in imports_of(path) if m.split(".")[0] in TREES}
    return found


def package_of(module: str) -> str:
    """``pdmesh.engine.scheduler`` -> ``pdmesh.engine``; a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_packages() -> None:
    graph: dict[str, dict[str, str]] = defaultdict(dict)  # package -> {package: via module}
    for module, imported in modules().items():
        for name in imported:
            source, target = package_of(module), package_of(name)
            if target != source and name not in TREES:  # ``import pdmesh``: no package
                graph[source].setdefault(target, f"{module} imports {name}")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between packages:\n  " + "\n  ".join(
        f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    )


def test_no_service_imports_another_services_internals() -> None:
    offenders = []
    for module, imported in modules().items():
        if not module.startswith("services."):
            continue
        own = package_of(module)
        for name in imported:
            if not name.startswith("services.") or name == "services":
                continue
            target = package_of(name)
            if target in (own, *SHARED_SERVICE_MODULES) or ALIASES.get(own) == target:
                continue
            offenders.append(f"{module} imports {name}")
    assert not offenders, "a service reaches into another's internals:\n" + "\n".join(offenders)


def test_proto_types_stay_at_the_edges() -> None:
    offenders = [
        f"{module} imports {name}"
        for module, imported in modules().items()
        if module.startswith("pdmesh.") and module not in PROTO_EDGES
        for name in imported
        if under(name, GENERATED)
    ]
    assert not offenders, "proto types inside the library:\n" + "\n".join(sorted(offenders))


def test_the_allow_lists_name_real_modules() -> None:
    # an entry for a module that moved or went would silently allow nothing
    known = modules()
    for module in (*PROTO_EDGES, *SHARED_SERVICE_MODULES, *ALIASES, *ALIASES.values()):
        assert module in known, module
