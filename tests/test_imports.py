"""The package's layers only point down: its import graph (function-local imports included,
``if TYPE_CHECKING:`` blocks excluded) has no cycle, and the bottom layers import no edit
kind, no evaluation and no organism."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vlmguard_edit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """Every node inside an ``if TYPE_CHECKING:`` block (imports for annotations only)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(child) for child in ast.walk(node))
    return inside


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement in ``module`` reaches (``from . import x``
    names the submodule x)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        tree = ast.parse(path.read_text("utf-8"))
        skip = type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for target in imported(node, name, path.name == "__init__.py"):
                if target in paths and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of module names (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 60  # the walk found the imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle_and_a_function_local_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from .kinds import get_kind\n")
    found = [t for n in ast.walk(tree) for t in imported(n, "vlmguard_edit.plan", False)]
    assert "vlmguard_edit.kinds" in found


# Modules at the bottom: data, I/O and pure math. None of them reaches up into the edit
# kinds, the evaluation or the organisms, not even inside a function.
BOTTOM = ("errors", "recipe_data", "layout", "checkpoint", "hub_client", "fold", "writes")
BOTTOM += ("record", "plan", "images", "formats", "families")
UPPER = ("kinds", "evaluate", "convert", "verify", "card", "api", "organisms", "learned")


@pytest.mark.parametrize("name", BOTTOM)
def test_bottom_modules_import_nothing_above_them(name):
    graph = import_graph()
    module = f"vlmguard_edit.{name}"
    assert module in graph
    reached, todo = set(), [module]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    above = sorted(m for m in reached if m.split(".")[1:2] and m.split(".")[1] in UPPER)
    assert not above, f"{module} reaches {above}"


@pytest.mark.parametrize("name", ["learned", "evaluate", "probes", "card", "plan", "record"])
def test_the_runtime_never_imports_the_organisms_by_name(name):
    """Learning and evaluation meet an organism only through the judge object its folder
    declares (organisms.exact.load_exact_judge, called by the kinds and the API)."""
    graph = import_graph()
    reached, todo = set(), [f"vlmguard_edit.{name}"]
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert not [m for m in reached if m.startswith("vlmguard_edit.organisms")], name
