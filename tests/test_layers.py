"""The layering of docs/DESIGN.md holds: each package imports only those below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sipmesh"

# What each top-level package may import from sipmesh (besides itself and the root module).
ALLOWED = {
    "sip": set(),
    "ops": set(),  # beside sip: sd_notify and the HTTP listeners, for broker and daemon alike
    "agent": {"sip", "ops"},
    "broker": {"sip", "ops"},
    "daemon": {"sip", "agent", "ops"},
    "apps": {"sip", "agent", "daemon", "ops"},
    "cli": {"sip", "agent", "broker", "daemon", "apps", "ops"},
}


def sipmesh_imports(path: Path) -> set[str]:
    """The sipmesh packages a module imports (module-level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "sipmesh":  # `from sipmesh import x`: only packages are layers
                names = [f"sipmesh.{alias.name}" for alias in node.names
                         if (SRC / alias.name).is_dir()]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sipmesh" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below(package: str) -> None:
    modules = sorted((SRC / package).rglob("*.py"))
    assert modules, f"no modules in sipmesh.{package}"
    known = set(ALLOWED) | {"__init__", "__main__"}
    violations = []
    for module in modules:
        for imported in sipmesh_imports(module) - {package, "__init__"}:
            if imported not in known:
                violations.append(f"{module.relative_to(SRC)} imports unknown sipmesh.{imported}")
            elif imported not in ALLOWED[package]:
                violations.append(f"{module.relative_to(SRC)} imports sipmesh.{imported}")
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_every_package_is_placed_in_a_layer() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)
