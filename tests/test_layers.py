"""The layering of docs/DESIGN.md holds: each package imports only those below it; no module
uses another's private names; no test module imports another (shared pieces live in
tests/lab/, tests/peers/ and conftest.py)."""

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
    # a namespace lab of real processes (the tests' and `sipmesh demo --lab`'s): it runs the
    # sipmesh command, writes the users file and TURN keys of its broker, asks members' status
    "lab": {"sip", "broker", "daemon", "agent", "ops"},
    "cli": {"sip", "agent", "broker", "daemon", "apps", "ops", "lab"},
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


# asyncio.wait_for loses a cancellation that meets the awaited result in Python 3.11 (a
# stopped agent's refresh loop ran on for ever: the CI hang of test_roster): src uses
# `async with asyncio.timeout(...)`. Modules that still use it, and why.
WAIT_FOR_LEFT: dict[str, str] = {}


def test_src_bounds_waits_with_asyncio_timeout() -> None:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "wait_for"
                    and isinstance(node.value, ast.Name) and node.value.id == "asyncio"):
                found.setdefault(str(path.relative_to(SRC)), []).append(node.lineno)
    new = {rel: lines for rel, lines in found.items() if rel not in WAIT_FOR_LEFT}
    assert not new, f"asyncio.wait_for (use asyncio.timeout): {new}"
    assert not set(WAIT_FOR_LEFT) - set(found), "converted: remove from WAIT_FOR_LEFT"


TESTS = Path(__file__).resolve().parent


def imports_of_test_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of a test module: `import tests.test_x`, `from
    tests.test_x import y`, `from tests import test_x`, `from .test_x import y`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [module] + [f"{module.rstrip('.')}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names
                  if name.rpartition(".")[2].startswith("test_")]
    return found


def test_no_test_module_imports_another() -> None:
    """Shared fixtures and helpers live in tests/lab/, tests/peers/ and conftest.py. (A module
    running its own code in a subprocess, ``python -c "from tests.test_x import main"``, is a
    string, not an import, and passes.)"""
    found = [f"{path.relative_to(TESTS)}:{line}: {name}"
             for path in sorted(TESTS.rglob("*.py"))
             for line, name in imports_of_test_modules(ast.parse(path.read_text(), str(path)))]
    assert not found, ("test modules imported (move the shared piece to tests/lab/, "
                       "tests/peers/ or conftest.py):\n  " + "\n  ".join(found))


def test_the_test_import_check_finds_one() -> None:
    tree = ast.parse("from tests.test_a import x\nimport tests.test_b\nfrom . import test_c\n"
                     "from .test_d import y\nfrom tests.lab import test_tools_present\n"
                     "from tests.lab.mesh import Member\n")
    assert [line for line, _ in imports_of_test_modules(tree)] == [1, 2, 3, 4, 5]


def test_every_package_is_placed_in_a_layer() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


# ---------------------------------------------------------------------------- private names
#
# A module uses only its own private (`_name`) attributes: `obj._name` in module M is a
# reach-in unless M itself defines `_name` (assigns `self._name`/`cls._name`, or defines it in
# a class body: method, class attribute, field, __slots__), and a class may not override a
# private method it inherits from a class of another module. `self._x`, `cls._x` and dunders
# are never reach-ins. Sound enough, not exact: `a._x` passes in a module that defines
# another `_x` of its own.

# Privates of the standard library and of third-party packages that we use on purpose.
# Keyed by the expression as written; "*._name" matches any object.
STDLIB_PRIVATE = {
    "os._exit": "leave a forked worker or a child at once, without the parent's atexit handlers",
    "sys._getframe": "cheap caller lookup",
    "*._replace": "namedtuple API (public despite the underscore)",
    "*._asdict": "namedtuple API (public despite the underscore)",
    "*._fields": "namedtuple API (public despite the underscore)",
    "*._make": "namedtuple API (public despite the underscore)",
    "argparse._SubParsersAction": "the type add_subparsers() returns has no public name "
                                  "(annotations only)",
    "subparsers._parser_class": "argparse has no public way to give one subcommand its own "
                                "parser class (ProgramArgumentParser splits off the program "
                                "after --)",
}

# Deliberate exceptions in our own code: "module: expression" -> why it stays.
ALLOWED_PRIVATE: dict[str, str] = {
    # aioice is pinned below 0.14 for exactly these (docs/DESIGN.md, dependencies)
    "agent/ice.py: keep.transport._TurnTransport__inner_protocol":
        "aioice keeps the TURN client of a relayed candidate private; the relay proxy "
        "(agent/handover.py) sends ChannelData on it (aioice's sendto costs a task per datagram)",
    "agent/streams.py: self.tls._request_client_certificate":
        "aioquic's server asks for a client certificate only in its own tests; the caller "
        "must be authenticated by its a=fingerprint too",
    "agent/streams.py: stream.sender._buffer":
        "a stream's unacknowledged bytes (the send-side back-pressure); aioquic has no "
        "public accessor",
}

def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defined_privates(tree: ast.AST) -> set[str]:
    """The private attributes a module defines: `self._x`/`cls._x` assigned anywhere, and
    methods, class attributes, fields and __slots__ entries in its class bodies."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(item.name)
                targets = item.targets if isinstance(item, ast.Assign) else \
                    [item.target] if isinstance(item, ast.AnnAssign) else []
                for target in targets:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Name):
                            names.add(leaf.id)
                    if isinstance(target, ast.Name) and target.id == "__slots__":
                        names.update(c.value for c in ast.walk(item.value)
                                     if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return {n for n in names if _private(n)}


def _imported_classes(tree: ast.AST, module: str, is_package: bool) -> dict[str, tuple[str, str]]:
    """Local name -> (sipmesh module, name there) for every `from X import Name` of sipmesh."""
    found = {}
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "sipmesh":
            continue
        for alias in node.names:
            found[alias.asname or alias.name] = (source, alias.name)
    return found


def _class_privates(tree: ast.AST, name: str) -> set[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return defined_privates(ast.Module(body=[node], type_ignores=[]))
    return set()


def private_reach_ins(src: Path = SRC) -> list[tuple[str, int, str]]:
    """(module path, line, "expression") of every use of another module's private."""
    modules = sorted(src.rglob("*.py"))
    trees = {path: ast.parse(path.read_text(), str(path)) for path in modules}
    by_name = {_module_name(path) if src == SRC else
               ".".join(["sipmesh", *path.relative_to(src).with_suffix("").parts]).removesuffix(".__init__"):
               path for path in modules}
    found = []
    for path, tree in trees.items():
        rel = str(path.relative_to(src))
        own = defined_privates(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if node.attr in own:
                    continue
                text = ast.unparse(node)
                if text in STDLIB_PRIVATE or f"*.{node.attr}" in STDLIB_PRIVATE:
                    continue
                found.append((rel, node.lineno, text))
        module = [name for name, p in by_name.items() if p == path][0]
        imported = _imported_classes(tree, module, path.name == "__init__.py")
        # `from sipmesh.other import _name`
        for local, (source, name) in imported.items():
            if _private(name) and by_name.get(source) not in (None, path):
                line = next(n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                            and any(a.name == name for a in n.names))
                found.append((rel, line, f"from {source} import {name}"))
        # a private method of a base class from another module, overridden here
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            mine = _class_privates(tree, node.name)
            for base in node.bases:
                if not isinstance(base, ast.Name) or base.id not in imported:
                    continue
                source, name = imported[base.id]
                base_path = by_name.get(source)
                if base_path is None or base_path == path:
                    continue
                for attr in sorted(mine & _class_privates(trees[base_path], name)):
                    found.append((rel, node.lineno, f"{node.name}({base.id}) overrides {attr}"))
    return found


def _key(rel: str, text: str) -> str:
    return f"{rel}: {text}"


def test_no_module_uses_another_modules_private_names(capsys) -> None:
    found = private_reach_ins()
    listed = set(ALLOWED_PRIVATE)
    keys = {_key(rel, text) for rel, _, text in found}
    report = "\n".join(f"  {rel}:{line}: {text}"
                       + ("  [allowed]" if _key(rel, text) in ALLOWED_PRIVATE else "")
                       for rel, line, text in found)
    if found:
        with capsys.disabled():
            print(f"\nprivate names used across modules ({len(found)}):\n{report}")
    new = sorted({_key(rel, text) for rel, _, text in found} - listed)
    assert not new, ("modules use private names of another module (make them public, or "
                     "list a deliberate exception in ALLOWED_PRIVATE with its reason):\n  "
                     + "\n  ".join(new))
    gone = sorted(listed - keys)
    assert not gone, "no longer found, remove from the allowlist:\n  " + "\n  ".join(gone)


def test_the_private_name_check_finds_a_reach_in(tmp_path: Path) -> None:
    """The check itself can fail: a module reaching into another's private is found, an
    override of a private method of another module's class too, own privates are not."""
    pkg = tmp_path / "sipmesh" / "core"
    pkg.mkdir(parents=True)
    (tmp_path / "sipmesh" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine.py").write_text(
        "_DEFAULT = 0\n\n"
        "class Engine:\n"
        "    def __init__(self):\n        self._state = _DEFAULT\n"
        "    def _step(self):\n        return self._state\n"
        "    def _tick(self):\n        return self._step()\n")
    (pkg / "user.py").write_text(
        "import os\nfrom .engine import Engine, _DEFAULT\n\n"
        "class Mine(Engine):\n"
        "    def _step(self):\n        return self._own\n"
        "    def __init__(self):\n        super().__init__()\n        self._own = 1\n\n"
        "def poke(engine, mine):\n"
        "    engine._state = 2\n    os._exit(0)\n"
        "    return engine._tick(), mine._own, Point(1, 2)._replace(x=3)\n")
    found = {(rel, text) for rel, _, text in private_reach_ins(tmp_path / "sipmesh")}
    assert found == {("core/user.py", "Mine(Engine) overrides _step"),
                     ("core/user.py", "from sipmesh.core.engine import _DEFAULT"),
                     ("core/user.py", "engine._state"), ("core/user.py", "engine._tick")}, found
