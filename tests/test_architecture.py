"""The package's import graph, computed from the source (AST): no cycles, and layers only import downwards.

Every ``import``/``from ... import`` counts, including those inside functions and under TYPE_CHECKING:
a function-level import is still a dependency a reader must follow. Runs without torch or transformers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "sdpa_shim"
#: Bottom to top. A module may import its own layer's modules and any layer below, never one above.
LAYERS = ("_version", "_state", "_core", "_runtime", "standin", "_integration", "_surfaces", "__init__")


def _module_name(path: Path) -> str:
    parts = ["sdpa_shim", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package counts as its ``__init__``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("sdpa_shim"):
                    if target == "sdpa_shim" and any(t != "sdpa_shim" and t in modules for t in targets):
                        continue  # ``from .. import x``: the edge is to x, not to the package
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer_of(module: str) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head == "__main__":
        return len(LAYERS) - 1
    return LAYERS.index(head)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_layers_import_only_downwards():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports that run up the layers " + str(LAYERS) + ": " + ", ".join(sorted(upward))


def test_every_module_is_in_a_layer():
    for module in _modules():
        layer_of(module)  # raises ValueError for a module outside the declared layers


@pytest.mark.parametrize("cycle", [{"a": {"b"}, "b": {"a"}, "c": set()}])
def test_the_cycle_finder_finds_a_planted_cycle(cycle):
    assert find_cycles(cycle) == [["a", "b"]]


if __name__ == "__main__":  # the graph for the architecture map: modules, edges, cycles
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} edges, cycles: {find_cycles(graph)}")
    for module in sorted(graph):
        print(f"{module}: {', '.join(sorted(graph[module])) or '-'}")
