"""The package's import structure: no module reaches into another's private names, no import cycle.

Every import counts, wherever it stands: at the top, inside a function (where a cycle hides from
the interpreter) or under ``if TYPE_CHECKING:`` (where it still ties the two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "raptr_fx"


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for each import of a module in ``modules``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:  # ``from . import cutting``: the module itself
                    found.append((submodule, "", node.lineno))
                elif base in modules:
                    found.append((base, alias.name, node.lineno))
    return found


def _import_graph(root: Path) -> tuple[nx.DiGraph, list[str]]:
    """Module -> the modules it imports, and the private names imported from another module."""
    modules = _modules(root)
    private = []
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for imported, member, line in _imports(name, path, modules):
            if imported != name:
                graph.add_edge(name, imported)
            if member.startswith("_") and not member.startswith("__"):
                private.append(f"{path.relative_to(root.parent)}:{line} imports {imported}.{member}")
    return graph, private


def _problems(root: Path) -> tuple[list[str], list[list[str]]]:
    """Private names imported from another module, and the import cycles, of the package at ``root``."""
    graph, private = _import_graph(root)
    cycles = sorted(sorted(cycle) for cycle in nx.simple_cycles(graph))
    return private, cycles


def test_no_module_imports_a_private_name_of_another():
    private, _ = _problems(PACKAGE)
    assert private == []


def test_no_import_cycle():
    _, cycles = _problems(PACKAGE)
    assert cycles == []


def test_run_time_code_does_not_load_the_analysis():
    """Gates and cuts read the value types (``units``), never the analysis that makes them."""
    graph, _ = _import_graph(PACKAGE)
    analysis = {"raptr_fx.discovery", "raptr_fx.unit_choice", "raptr_fx.unit_facts", "raptr_fx.module_graph",
                "raptr_fx.probe", "raptr_fx.width", "raptr_fx.width_facts", "raptr_fx.mlp_groups",
                "raptr_fx.head_groups"}
    for module in ("raptr_fx.gates", "raptr_fx.cutting", "raptr_fx.units", "raptr_fx.skipping"):
        assert nx.descendants(graph, module) & analysis == set(), module


def test_the_check_finds_hidden_cycles_and_private_imports(tmp_path):
    """The check itself: an import inside a function closes a cycle, a private name is reported."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import public\n")
    (package / "b.py").write_text("def public():\n    from .a import _helper\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n")
    (package / "d.py").write_text("import pkg.c\n")
    private, cycles = _problems(package)
    assert private == ["pkg/b.py:2 imports pkg.a._helper"]
    assert cycles == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
