"""The package structure's rules, read from every import in the source (function bodies too).

- Layers: ``ublk_driver`` <- ``kernel_agent`` <- ``ml`` <- ``bench``; a package imports
  only its own layer and the ones below.  Inside the driver, ``ublk_driver.core``
  (errors, sizes, CLI plumbing) imports nothing else of ublkml.
- No import cycle between modules, deferred imports included (importing a
  package's ``__init__`` by importing one of its modules does not count).
- Only the cffi layer (``ublk_driver._bindings``; ``_build`` compiles it) names the
  compiled module or its ``ffi``.

The layers above the driver reach it through entry points (``ublkml.commands``,
``ublkml.server_hooks``), never through an import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("ublk_driver", "kernel_agent", "ml", "bench")
CORE = "ublk_driver.core"
CFFI_MODULE = "ublk_driver._ublkml_cffi"
CFFI_LAYER = {"ublk_driver._bindings", "ublk_driver._build"}


@dataclass(frozen=True)
class Import:
    source: str     # the importing module
    target: str     # the imported module (or the name imported from a package)
    where: str      # file:line


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([name] if name else [])])


def imports_of(root: Path, packages: tuple[str, ...]) -> Iterator[Import]:
    """Every import statement (any depth) and ``import_module("literal")`` call."""
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            module = module_name(root, path)
            is_package = path.name == "__init__.py"
            tree = ast.parse(path.read_text(), str(path))
            rel = path.relative_to(root)
            for node in ast.walk(tree):
                where = f"{rel}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        yield Import(module, alias.name, where)
                elif isinstance(node, ast.ImportFrom):
                    target = (_resolve(module, is_package, node.level, node.module)
                              if node.level else node.module or "")
                    for alias in node.names:
                        # `from pkg import mod` imports pkg.mod when it is a module
                        yield Import(module, f"{target}.{alias.name}", where)
                elif (isinstance(node, ast.Call) and node.args
                      and isinstance(node.args[0], ast.Constant)
                      and isinstance(node.args[0].value, str)
                      and getattr(node.func, "attr", getattr(node.func, "id", None))
                      == "import_module"):
                    yield Import(module, node.args[0].value, where)


def known_module(target: str, modules: set[str]) -> str | None:
    """The project module ``target`` names (``a.b.NAME`` -> ``a.b``), or None."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def graph(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, set[str]], list[Import]]:
    modules = {module_name(root, p) for pkg in packages for p in (root / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    found = []
    for imp in imports_of(root, packages):
        target = known_module(imp.target, modules)
        if target is None or target == imp.source:
            continue
        # A module's own package __init__ runs when it is imported anyway.
        if imp.source.startswith(target + "."):
            continue
        edges[imp.source].add(target)
        found.append(Import(imp.source, target, imp.where))
    return edges, found


def layer_violations(found: list[Import], layers: tuple[str, ...] = LAYERS,
                     core: str = CORE) -> list[str]:
    rank = {name: i for i, name in enumerate(layers)}
    bad = []
    for imp in found:
        src, dst = imp.source.split(".")[0], imp.target.split(".")[0]
        if rank[dst] > rank[src]:
            bad.append(f"{imp.where}: {imp.source} imports {imp.target}, a higher layer")
        in_core = imp.source == core or imp.source.startswith(core + ".")
        if in_core and not (imp.target == core or imp.target.startswith(core + ".")):
            bad.append(f"{imp.where}: {imp.source} (the core) imports {imp.target}")
    return list(dict.fromkeys(bad))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def cffi_violations(root: Path, packages: tuple[str, ...]) -> list[str]:
    bad = []
    for imp in imports_of(root, packages):
        if imp.source in CFFI_LAYER:
            continue
        if imp.target == CFFI_MODULE or imp.target.startswith(CFFI_MODULE + "."):
            bad.append(f"{imp.where}: {imp.source} imports the compiled module")
        if imp.target in ("cffi", "cffi.FFI") or imp.target.endswith("._bindings.ffi"):
            bad.append(f"{imp.where}: {imp.source} uses cffi directly")
    return bad


# ---- the project's own tree ---------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, set[str]], list[Import]]:
    return graph(ROOT, LAYERS)


def test_layers_point_one_way(project: tuple[dict[str, set[str]], list[Import]]) -> None:
    assert layer_violations(project[1]) == []


def test_no_import_cycles(project: tuple[dict[str, set[str]], list[Import]]) -> None:
    assert cycles(project[0]) == []


def test_only_the_cffi_layer_touches_the_compiled_module() -> None:
    assert cffi_violations(ROOT, LAYERS) == []


# ---- the checker itself, on small trees made for it -----------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_finds_a_deferred_back_import(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from high.b import g\n    return g\n",
        "high/__init__.py": "",
        "high/b.py": "from low import a\ng = 1\n",
    })
    edges, found = graph(root, ("low", "high"))
    bad = layer_violations(found, ("low", "high"), core="low.core")
    assert bad == ["low/a.py:2: low.a imports high.b, a higher layer"]
    assert cycles(edges) == [["high.b", "low.a"]]


def test_checker_finds_a_cycle_inside_a_package_and_the_core_rule(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        "low/core/__init__.py": "",
        "low/core/errors.py": "import low.server\n",
        "low/server.py": "from .core.errors import X\nfrom . import cli\n",
        "low/cli.py": "import importlib\nimportlib.import_module('low.server')\n",
    })
    edges, found = graph(root, ("low",))
    assert layer_violations(found, ("low",), core="low.core") == [
        "low/core/errors.py:1: low.core.errors (the core) imports low.server"]
    assert cycles(edges) == [["low.cli", "low.server"], ["low.core.errors", "low.server"]] or \
        cycles(edges) == [["low.cli", "low.core.errors", "low.server"]]


def test_checker_finds_cffi_outside_its_layer(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "ublk_driver/__init__.py": "",
        "ublk_driver/_bindings.py": "from ublk_driver._ublkml_cffi import ffi, lib\n",
        "ublk_driver/queue.py": "from ublk_driver._ublkml_cffi import lib\n",
    })
    assert cffi_violations(root, ("ublk_driver",)) == [
        "ublk_driver/queue.py:1: ublk_driver.queue imports the compiled module"]
