"""The shape of the package, checked from its source: who imports whom, and how big things are.

- The core sits at the top of the package (at most 12 modules: the objective, the ensemble, likelihoods, uncertainty,
  configs, model loading, save/load); the rest lives in wings, and imports point downwards: ``data`` imports the core;
  ``training``, ``evaluation`` and ``stability`` import the core and ``data``; ``commands`` and ``demo`` import
  anything but each other; only the package root and ``cli`` import ``commands`` / ``demo``. The core imports no wing.
- No import circle at all. ``TYPE_CHECKING`` imports count too.
- Each public name (a top-level function, class or constant without a leading underscore) is defined in one module,
  and the package root re-exports every name from its home.
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
# What each part may import besides itself (the core: only the core).
MAY_IMPORT = {"core": {"core"}, "data": {"core"}, "training": {"core", "data"}, "evaluation": {"core", "data"},
              "stability": {"core", "data"}, "commands": {"core", "data", "training", "evaluation", "stability"},
              "demo": {"core", "data", "training", "evaluation", "stability"}}


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


def part(name: str) -> str:
    """``core``, a wing's name, or ``entry`` (the package root and ``cli``)."""
    if name in ENTRY_POINTS:
        return "entry"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in MAY_IMPORT else "core"


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_graph_sees_the_package():
    expected = {"renyi_lora.ensemble", "renyi_lora.training.trainer", "renyi_lora.commands.train",
                "renyi_lora.demo.run"}
    assert expected <= set(GRAPH)
    assert "renyi_lora.likelihoods" in GRAPH["renyi_lora.ensemble"]  # an edge we know of
    assert part("renyi_lora.objective") == "core" and part("renyi_lora.data.sft") == "data"


def test_no_import_circles():
    try:
        list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import circle: {' -> '.join(error.args[1])}")


def test_imports_point_downwards():
    wrong = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if part(name) != "entry"
                   for target in targets if part(target) not in MAY_IMPORT[part(name)] | {part(name)})
    assert wrong == []


def test_the_core_is_small():
    core = sorted(name for name in MODULES if part(name) == "core")
    assert len(core) <= 12, core


def public_definitions() -> dict[str, list[str]]:
    """Public top-level names -> the modules that define them (functions, classes, constants, class aliases)."""
    homes: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        if name == "renyi_lora.cli":  # its functions are the commands' handlers, named after the commands
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined = [t.id for t in targets if isinstance(t, ast.Name) and t.id[0].isupper()]  # constants, aliases
            else:
                continue
            for public in defined:
                if not public.startswith("_"):
                    homes.setdefault(public, []).append(name)
    return homes


def test_each_public_name_has_one_home_and_the_root_exports_it_from_there():
    homes = public_definitions()
    # main(): each command module's entry point; LoraEnsemble's twin functions are methods elsewhere.
    twice = {name: modules for name, modules in homes.items() if len(modules) > 1 and name != "main"}
    assert twice == {}
    tree = ast.parse(MODULES["renyi_lora"].read_text())
    exports = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets))
    wrong = {name: home for name, home in exports.items() if homes.get(name) != [home]}
    assert wrong == {}


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
    for name in ("renyi_lora.training.trainer", "renyi_lora.training.dpo"):
        for node in ast.parse(MODULES[name].read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Trainer"):
                assert node.end_lineno - node.lineno + 1 <= 300, f"{node.name}: {node.end_lineno - node.lineno + 1}"


def test_library_functions_take_their_fifth_parameter_by_name():
    """More than four parameters: the rest are keyword-only, so that inserting one never shifts a caller's arguments."""
    wide = []
    for name, path in MODULES.items():
        if in_wing(name) or name in ENTRY_POINTS:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 4:
                    wide.append(f"{name}.{node.name}: {len(positional)}")
    assert wide == []
