"""The package's architecture, checked: layers import only downwards, no import cycles, and
the maths in `tether.core` depends on nothing but torch and the standard library.

Every import counts, including those inside functions: a lazy import that hides a cycle is
still a cycle for a reader.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tether

PACKAGE = Path(tether.__file__).parent

# Bottom to top. A module may import its own unit and the units of lower layers.
LAYERS = (
    ("tether", "tether.errors", "tether.console", "tether.core"),  # `tether`: its __init__ alone
    ("tether.config", "tether.hardware", "tether.data"),
    ("tether.models",),
    ("tether.fast", "tether.runs", "tether.rewards"),
    ("tether.rollout",),
    ("tether.stages",),
    ("tether.tools",),
    ("tether.api",),
    ("tether.cli",),
    ("tether.__main__",),
)


# The one import that goes up: the package's face. `tether.sft(...)` is tether.api.sft, which
# `tether/__init__.py` imports on first use, so `import tether` itself stays light.
FACADE = {("tether", "tether.api")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, resolved to full names (`from tether.x import y` counts as
    tether.x.y where that is a module, else tether.x)."""
    known = modules()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = (
                    name.split(".")[: -node.level] if path.stem != "__init__" else name.split(".")
                )
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def unit_of(name: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for layer, units in enumerate(LAYERS):
        for unit in units:
            inside = name.startswith(unit + ".") and unit != "tether"
            if (name == unit or inside) and (best is None or len(unit) > len(best[1])):
                best = (layer, unit)
    assert best is not None, f"{name} is in no layer of LAYERS"
    return best


def test_every_module_sits_in_a_layer_and_imports_only_downwards():
    wrong = []
    for name, path in modules().items():
        layer, unit = unit_of(name)
        for imported in imports_of(path, name):
            if not imported.startswith("tether"):
                continue
            other_layer, other_unit = unit_of(imported)
            if other_unit != unit and other_layer >= layer and (name, imported) not in FACADE:
                wrong.append(f"{name} (layer {layer}) imports {imported} (layer {other_layer})")
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    graph = {
        name: {i for i in imports_of(path, name) if i in modules() and i != name}
        for name, path in modules().items()
    }
    # A package's __init__ is imported with each of its modules; it imports none of them.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_core_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    for name, path in modules().items():
        if not name.startswith("tether.core"):
            continue
        for imported in imports_of(path, name):
            top = imported.split(".")[0]
            assert top in allowed or imported.startswith("tether.core"), (
                f"{name} imports {imported}"
            )


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check above can fail: an import from a higher layer is reported."""
    path = tmp_path / "fake.py"
    path.write_text("from tether.stages.ppo import run_ppo\n")
    imported = imports_of(path, "tether.core.fake")
    assert "tether.stages.ppo" in imported
    assert unit_of("tether.stages.ppo")[0] > unit_of("tether.core.fake")[0]
