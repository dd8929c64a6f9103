"""The project's import graph: no cycles, and the engine never reaches into the commands.

Every module of `emloc`, `stream` and `sinks` is parsed (not imported), and every import it runs,
at module level or inside a function, becomes an edge to the project module it names. Imports under
`if TYPE_CHECKING:` never run and are left out. A cycle is named module by module when one appears.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("emloc", "stream", "sinks")
# the command modules and the CLI that dispatches to them: the only ones allowed to import a command
ENTRY_POINTS = ("stream.commands", "stream.cli")


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> source file."""
    found = {}
    for package in PACKAGES:
        found[package] = ROOT / package / "__init__.py"
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=package + "."):
            base = ROOT.joinpath(*info.name.split("."))
            found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Every Import/ImportFrom under `node` that runs: `if TYPE_CHECKING:` bodies are skipped."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    skip_body = isinstance(node, ast.If) and _type_checking_only(node)
    for child in node.orelse if skip_body else ast.iter_child_nodes(node):
        yield from _imports(child)


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted `name` that is a project module (an attribute import such as
    `emloc.observer.Observer` names `emloc.observer`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports, relative imports resolved."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import name`: name is a submodule or an attribute of pkg
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _project_module(name, modules)
            if target is not None and target != module:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_is_read():
    """The parser sees the imports it should, relative and function-level alike: a check that the
    graph the other tests walk is not empty."""
    graph = import_graph()
    assert {"emloc", "stream", "sinks", "stream.cli", "stream.commands.live", "emloc.observer"} <= set(graph)
    assert "emloc.cache" in graph["emloc.observer"]  # `from .cache import PrunedCache`
    assert "stream.commands.live" in graph["stream.cli"]  # `from .commands import ..., live, ...`


def test_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", PACKAGES)
def test_only_entry_points_import_commands(package):
    """The engine (emloc, stream's services, HTTP, MQTT, Ray) never imports a command module:
    commands are thin entry points over it."""
    graph = import_graph()
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items() if module.split(".")[0] == package
        and not any(module == e or module.startswith(e + ".") for e in ENTRY_POINTS)
        for target in targets if target == "stream.commands" or target.startswith("stream.commands."))
    assert not offenders, "; ".join(offenders)
