"""The package's import graph has no cycle: layers import downwards only, and pieces that two modules
share live in a leaf module (cli/commands.py, spec/qemuopts.py) instead of one importing the other.

Every ``import`` counts, at module level and inside functions (a lazy import is still a dependency:
it only moves the cost), except those under ``if TYPE_CHECKING:`` (never run). Importing
``a.b.c`` also runs the packages ``a`` and ``a.b``, so those count as imported too.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "qemuspec")


def _modules() -> dict[str, str]:
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The qemuspec modules ``module`` imports anywhere in its code, TYPE_CHECKING blocks left out."""
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    names: list[str] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                for statement in child.orelse:
                    walk(ast.Module(body=[statement], type_ignores=[]))
            elif isinstance(child, ast.Import):
                names.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                target = ".".join(base + ([child.module] if child.module else []))
                names.extend(
                    f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                    for alias in child.names
                )
            else:
                walk(child)

    walk(ast.parse(open(path).read(), path))
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            target = ".".join(parts[:i])
            if target in modules and target != module and not module.startswith(target + "."):
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imported(module, path, modules) for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each with one cycle
    through it as the path to show."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One cycle inside a component, as `a -> b -> a`, for the failure message."""
    start, members = component[0], set(component)
    trail, seen = [start], {start}
    while True:
        nxt = sorted(graph[trail[-1]] & members)
        back = [n for n in nxt if n in seen]
        if back:
            return " -> ".join(trail[trail.index(back[0]) :] + [back[0]])
        trail.append(nxt[0])
        seen.add(nxt[0])


def test_the_package_imports_without_a_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (move what both sides need into a leaf module):\n" + "\n".join(
        _path(graph, c) for c in found
    )


def test_the_walker_sees_lazy_imports_and_skips_type_checking():
    """The check itself can fail: a cycle through a function-level import is found, one through a
    TYPE_CHECKING import is not."""
    graph = import_graph()
    assert "qemuspec.spec.models" in graph["qemuspec.spec.loader"]  # module level
    assert "qemuspec.spec.passthrough" in graph["qemuspec.spec.models"]  # inside a validator
    assert "qemuspec.runtime.instance" not in graph["qemuspec.runtime.warm"]  # TYPE_CHECKING only
    planted = {
        **graph,
        "qemuspec.spec.qemuopts": graph["qemuspec.spec.qemuopts"] | {"qemuspec.spec.models"},
    }
    assert any("qemuspec.spec.qemuopts" in c for c in cycles(planted))


def test_the_leaf_modules_stay_leaves():
    """The shared pieces were moved out to cut cycles; they must not grow dependencies back."""
    graph = import_graph()
    assert graph["qemuspec.cli.commands"] == set()
    assert graph["qemuspec.spec.qemuopts"] <= {"qemuspec.errors"}
    assert graph["qemuspec.privdir"] == set()
