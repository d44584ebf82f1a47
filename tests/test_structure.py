"""The shape of the package, checked from its source: who imports whom, and how big things are.

- No import circle between ``renyi_lora`` modules, except the ``ensemble`` <-> ``io`` pair if one appears (a
  PEFT-like ``save_pretrained`` facade; there is none today). ``TYPE_CHECKING`` imports count too.
- Library modules never import from the wings (``renyi_lora.commands``, ``renyi_lora.demo``); only the package root
  and ``cli`` may.
- No ``renyi_lora`` import inside a function, except in ``cli.py`` (which keeps start-up fast).
- Every module at most 400 lines, every trainer class at most 300.

Run it alone to see the graph's verdict: ``pytest tests/test_structure.py``.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "renyi_lora"
WINGS = ("renyi_lora.commands", "renyi_lora.demo")
ENTRY_POINTS = {"renyi_lora", "renyi_lora.cli"}
ALLOWED_CIRCLE = {"renyi_lora.ensemble", "renyi_lora.io"}


def module_name(path: Path) -> str:
    parts = ("renyi_lora", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST) -> set[str]:
    """The ``renyi_lora`` modules an import statement names (``from a import b`` counts ``a.b`` if it is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("renyi_lora"):
        names = {f"{node.module}.{alias.name}" for alias in node.names}
        return {node.module} | names & MODULES.keys()
    return set()


def imports_of(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    return {target for node in ast.walk(tree) for target in imported(node)} - {name, "renyi_lora"}


def in_wing(name: str) -> bool:
    return any(name == wing or name.startswith(wing + ".") for wing in WINGS)


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_graph_sees_the_package():
    assert {"renyi_lora.ensemble", "renyi_lora.train", "renyi_lora.commands.train", "renyi_lora.demo.run"} <= set(GRAPH)
    assert "renyi_lora.likelihoods" in GRAPH["renyi_lora.ensemble"]  # an edge we know of


def test_no_import_circles():
    graph = {name: targets for name, targets in GRAPH.items()}
    # Allow the facade pair: drop one direction of it before sorting.
    graph["renyi_lora.io"] = graph["renyi_lora.io"] - ALLOWED_CIRCLE
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import circle: {' -> '.join(error.args[1])}")


def test_library_modules_do_not_import_the_wings():
    upward = sorted(f"{name} -> {target}" for name, targets in GRAPH.items()
                    if not in_wing(name) and name not in ENTRY_POINTS for target in targets if in_wing(target))
    assert upward == []


def test_no_renyi_lora_import_inside_functions_except_the_cli():
    found = []
    for name, path in MODULES.items():
        if name == "renyi_lora.cli":
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{name}.{function.name}: {sorted(imported(node))}" for node in ast.walk(function)
                          if imported(node)]
    assert found == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= 400, f"{name} has {lines} lines"


def test_trainer_classes_are_small():
    for name in ("renyi_lora.train", "renyi_lora.preference"):
        for node in ast.parse(MODULES[name].read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Trainer"):
                assert node.end_lineno - node.lineno + 1 <= 300, f"{node.name}: {node.end_lineno - node.lineno + 1}"
