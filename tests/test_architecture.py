"""The shape of the package: no import cycle, small modules and functions, one-way layers.

The import graph is built from the source with ``ast``: every ``import`` and ``from ... import``
anywhere in a module (function bodies included; ``if TYPE_CHECKING:`` blocks excluded, since they
never run), plus the package ``__init__`` that Python imports first for a dotted target.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kdbench"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: A module or function over the limit says why in a comment containing this.
WHY = "size:"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """The kdbench modules ``name`` imports (resolved, relative imports included)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)  # `from pkg import submodule`
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            if target not in MODULES or (name + ".").startswith(target + "."):
                continue  # not kdbench's, or a package this module is inside (being imported already)
            targets.add(target)
            # Importing a.b.c runs a.b's __init__ first, unless the importer is inside a.b already.
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in MODULES and not (name + ".").startswith(parent + "."):
                    targets.add(parent)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "kdbench.sweep.plan" in graph["kdbench.sweep.driver"]          # from .plan import ...
    assert "kdbench.train" in graph["kdbench.sweep.runner"]               # from .. import train
    assert "kdbench.sweep.worker" in graph["kdbench.cli.build"]
    assert "kdbench.sweep" in graph["kdbench.report.rows"]                 # the package __init__ runs first


def test_kdbench_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(("lower", "upper"), [
    ("kdbench.executors", "kdbench.sweep"),    # executors get the task function; they never import the sweep
    ("kdbench.train", "kdbench.sweep"),        # the engine knows nothing of sweeps, stores or rows
    ("kdbench.data", "kdbench.train"),
    ("kdbench.sweep", "kdbench.report"),       # the report reads rows; the sweep never reads the report
    ("kdbench.sweep", "kdbench.cli"),
    ("kdbench.train", "kdbench.cli"),
])
def test_layers_import_one_way(lower, upper):
    graph = import_graph()
    wrong = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith(lower + ".") or m == lower
                   for t in ts if t == upper or t.startswith(upper + "."))
    assert not wrong, wrong


def test_modules_and_functions_are_small_or_say_why():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES and WHY not in text:
            too_long.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1: node.end_lineno])
                if size > MAX_FUNCTION_LINES and WHY not in body:
                    too_long.append(f"{name}.{node.name}: {size} lines")
    assert not too_long, f"over {MAX_MODULE_LINES} lines per module or {MAX_FUNCTION_LINES} per function " \
                         f"without a '# {WHY} ...' comment saying why: {too_long}"
