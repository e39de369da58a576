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


#: The one module that patches: it owns the wrapper type, the patch primitives and the undo stack.
LEDGER = "sdpa_shim._integration.ledger"
#: Modules still patching with their own undo (none: every unit patches through the ledger).
PATCHES_OUTSIDE_THE_LEDGER: set[str] = set()

#: Statements that look like patching but change the shim's own objects, each with why.
OWN_OBJECTS = {
    # the import system stamps the flash_attn alias spec on sdpa_shim.standin; the finder puts its own back
    ("sdpa_shim._integration.standin_import", "module.__spec__ = ..."),
    # the registry's replacement functions are the shim's own: they name the function they stand for
    ("sdpa_shim._integration.registry", "wrapper.__sdpa_shim_original__ = ..."),
    ("sdpa_shim._integration.registry", "wrapper.__wrapped__ = ..."),
    ("sdpa_shim._integration.registry", "wrapper.__doc__ = ..."),
}


def patching_statements(source: str) -> list[str]:
    """Statements that change another object's attributes the way patching does: ``setattr``/``delattr``
    calls, and assignments to a dunder attribute (``cls.__init__ = ...``) of anything but a function
    defined in the same scope (``f.__wrapped__ = ...`` on one's own helper is not patching)."""
    found: list[str] = []
    for scope in ast.walk(ast.parse(source)):
        body = getattr(scope, "body", None)
        if not isinstance(body, list):
            continue
        local_functions = {
            node.name for node in ast.walk(scope) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        for node in ast.walk(scope):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("setattr", "delattr")
            ):
                found.append(f"line {node.lineno}: {node.func.id}(...)")
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr.startswith("__")
                    and not (isinstance(target.value, ast.Name) and target.value.id in local_functions)
                ):
                    found.append(f"line {node.lineno}: {ast.unparse(target)} = ...")
    return sorted(set(found))


def test_only_the_ledger_patches():
    """Every change to transformers' (or torch's) objects goes through the ledger, so deactivate undoes it."""
    patching = {
        name: statements
        for name, path in _modules().items()
        if name != LEDGER and name not in PATCHES_OUTSIDE_THE_LEDGER
        for statements in [
            [
                found
                for found in patching_statements(path.read_text(encoding="utf-8"))
                if (name, found.partition(": ")[2]) not in OWN_OBJECTS
            ]
        ]
        if statements
    }
    assert not patching, f"patching outside {LEDGER}: {patching}"


def test_the_patch_finder_finds_planted_patches():
    planted = (
        "def install(module, cls, wrapper):\n"
        "    setattr(module, 'get_imports', wrapper)\n"
        "    cls.__init__ = wrapper\n"
        "    def helper():\n"
        "        pass\n"
        "    helper.__wrapped__ = wrapper\n"
    )
    assert patching_statements(planted) == ["line 2: setattr(...)", "line 3: cls.__init__ = ..."]


@pytest.mark.parametrize("cycle", [{"a": {"b"}, "b": {"a"}, "c": set()}])
def test_the_cycle_finder_finds_a_planted_cycle(cycle):
    assert find_cycles(cycle) == [["a", "b"]]


if __name__ == "__main__":  # the graph for the architecture map: modules, edges, cycles
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} edges, cycles: {find_cycles(graph)}")
    for module in sorted(graph):
        print(f"{module}: {', '.join(sorted(graph[module])) or '-'}")
