"""The layout is the architecture: subpackages in layers, each importing only from layers below it, and no
import cycle between modules. Function-local imports count: a local import cannot hide a cycle or an upward
dependency."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import flexolmo

PACKAGE_DIR = Path(flexolmo.__file__).parent
# Lowest first. A module may import its own subpackage and any subpackage of a lower layer; subpackages that
# share a layer may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("data", "trust"),
    ("model",),
    ("training",),
    ("evaluation",),
    ("owner",),
    ("coordinator",),
    ("experiments", "serve", "service"),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every flexolmo module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flexolmo"):
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in candidates if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) - {name} for name, path in known.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


def test_every_subpackage_has_a_layer():
    subpackages = {path.parent.name for path in PACKAGE_DIR.glob("*/__init__.py")}
    assert subpackages <= set(RANK), f"subpackages without a layer: {sorted(subpackages - set(RANK))}"
    top_level = {path.stem for path in PACKAGE_DIR.glob("*.py")} - {"__init__", "__main__"}
    assert not top_level, f"modules outside every subpackage: {sorted(top_level)}"


def test_no_import_reaches_up_or_sideways():
    violations = []
    for module, targets in import_graph().items():
        source = layer(module)
        for target in targets:
            goal = layer(target)
            if source is None or goal is None or goal == source:
                continue
            if RANK[goal] >= RANK[source]:
                violations.append(f"{module} -> {target}")
    assert not violations, "imports that reach a layer at or above their own:\n" + "\n".join(sorted(violations))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state[target] == 1:
                return stack[stack.index(target):] + [target]
            if state[target] == 0:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state[node] == 0:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"a"}}, True),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert (find_cycle(graph) is not None) == cycle
