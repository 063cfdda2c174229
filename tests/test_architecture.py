"""The package layering of docs/architecture.md: no module imports a package above its own
(function-level imports included), read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moespec"

#: bottom to top; a package may import its own layer and those below it
LAYERS = [
    {"paths", "cache", "cli", "distributed", "jsonl"},
    {"routing"},
    {"hooks"},
    {"moe"},
    {"models"},
    {"data"},
    {"eval"},
    {"train"},
    {"report"},
    {"demo", "heads"},
]
#: (module, package it may import although above it): none
KNOWN_UPWARD: set[tuple[str, str]] = set()
#: module cycles left, each with its reason in the doc: the MoE backend registry imports the
#: wrappers of optional libraries (DeepSpeed, MegaBlocks) when a backend is built
KNOWN_CYCLES = [
    [
        "moespec.moe.backend",
        "moespec.moe.config",
        "moespec.moe.deepspeed",
        "moespec.moe.layer",
        "moespec.moe.megablocks",
        "moespec.moe.native",
    ]
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``moespec`` module ``path`` imports, at any depth of its code."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> set[str]:
    """The ``moespec`` modules that ``source`` (the module ``module``) imports anywhere."""
    package = module if is_package else module.rsplit(".", 1)[0]
    out = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("moespec")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("moespec"):
                out.add(target)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (types only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def test_every_package_has_a_layer():
    packages = {top_package(module_name(p)) for p in PACKAGE.rglob("*.py")} - {""}
    assert packages == set().union(*LAYERS)


def test_no_module_imports_a_package_above_its_own():
    upward = set()
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        mine = top_package(source)
        for target in imported_modules(path):
            theirs = top_package(target)
            if mine and theirs and layer_of(theirs) > layer_of(mine):
                upward.add((source, theirs))
    assert upward == KNOWN_UPWARD


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (``from pkg import name`` resolved to ``pkg``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in imported_modules(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycle_between_modules():
    """Through function-level imports too (a package's ``__init__`` re-exporting excepted)."""
    assert cycles(module_graph()) == KNOWN_CYCLES


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_check_sees_an_upward_import_inside_a_function():
    """The form that hid cycles: a relative import in a function body."""
    source = "def f():\n    from ..train import trainer\n"
    assert imports_in(source, "moespec.routing.probe", False) == {"moespec.train"}
