"""The house plan (docs/design.md, "The tree"): packages that show the way
of a request, and imports that only go down. A module may import its own
package and any package in a lower layer; nothing imports upward, so there
is no cycle between packages. Each package says in its docstring what it
owns and what it may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cr_proxy"

# Lowest first. A name is a subpackage or a top-level module.
LAYERS: list[set[str]] = [
    {"errors"},
    {"oci"},
    {"net"},
    {"config"},
    {"metrics"},
    {"cache"},
    {"upstream"},
    {"front"},
    {"fetch"},
    {"edge"},
    {"ops"},
    {"privsep"},
    {"nginx"},
    {"serve"},
    {"cli"},
    {"__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit_of(path: Path) -> str:
    """The package (or top-level module) a source file belongs to."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (names for type hints
    only: no import at run time, so no cycle)."""
    nodes: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def imported_units(path: Path) -> set[str]:
    units = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "cr_proxy":
                continue
            if len(parts) > 1:
                units.add(parts[1])
            else:  # from cr_proxy import nginx, privsep
                units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; the house uses absolute ones")
        elif isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("cr_proxy."))
    return units


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_package_and_module_has_a_layer() -> None:
    assert {unit_of(p) for p in SOURCES} - {"__init__"} <= set(LAYER_OF)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path: Path) -> None:
    unit = unit_of(path)
    if unit == "__init__":
        return
    upward = {u for u in imported_units(path) - {unit} if LAYER_OF[u] >= LAYER_OF[unit]}
    assert not upward, f"{path.relative_to(PACKAGE)} ({unit}) imports {upward}: not below it"


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_each_package_says_what_it_owns_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and "May import" in doc, package
