"""The package's layering, read from its source with ``ast`` (nothing is imported).

- No import cycle among the modules of ``grpo_kernels``. Every import counts: at module level or inside a
  function, ``importlib.import_module("grpo_kernels....")``, and a string constant that names one of the
  package's modules (the backend registry's table, which ``grpo_kernels.backends`` imports on first use).
  Importing ``a.b.c`` also runs the sub-package ``a.b``'s ``__init__``, so that edge counts too; the root
  package's ``__init__`` (run before any of its modules) and the importer's own packages do not.
- No private name of one module used by another: ``from m import _x`` or ``m._x`` (``m`` a module of the
  package; private modules such as ``_extension`` may be imported, their private names may not). The tests
  may reach into the modules they test; this applies to the package.
- The specification (``reference.py``, ``loss_table.py``) imports only the standard library, torch and itself.
- The kernel backends (``triton/``, ``native/``) never reach the public API or the integrations, directly or
  through another module.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

PACKAGE = "grpo_kernels"
ROOT = Path(__file__).resolve().parents[1]

# Private names that other modules may use, with the reason.
ALLOWED_PRIVATE = {
    ("grpo_kernels._extension", "_C"): "the compiled extension module grpo_kernels._C itself (None where it did not "
                                       "load): the submodule's own name, as torch._C",
}
SPEC = ("grpo_kernels.reference", "grpo_kernels.loss_table")
KERNELS = ("grpo_kernels.triton", "grpo_kernels.native")
PUBLIC_API = ("grpo_kernels.ops", "grpo_kernels.module", "grpo_kernels.custom_ops", "grpo_kernels.integrations")


class Import(NamedTuple):
    importer: str
    line: int
    module: str  # the module of the package it imports
    name: str  # the name taken from it ("" for the module itself)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text())


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _owner(dotted: str, modules: set[str]) -> str:
    """The module that ``dotted`` names or lies in: ``pkg.mod.attr`` -> ``pkg.mod``."""
    while dotted not in modules and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
    return dotted


def _from_targets(name: str, is_package: bool, node: ast.ImportFrom, modules: set[str]) -> Iterator[tuple[str, Import]]:
    """``(bound name, what it is)`` of each name of a ``from ... import`` of the package."""
    if node.level:
        parts = (name if is_package else name.rsplit(".", 1)[0]).split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        use = Import(name, node.lineno, sub, "") if sub in modules else \
            Import(name, node.lineno, _owner(base, modules), alias.name)
        yield alias.asname or alias.name, use


def imports(name: str, tree: ast.AST, is_package: bool, modules: set[str]) -> Iterator[Import]:
    """Every use of another module of the package by module ``name``: imports anywhere in the file, dynamic
    imports by a constant, constants naming a module, and ``alias.attr`` of an imported module."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield Import(name, node.lineno, _owner(alias.name, modules), "")
                    if alias.asname and alias.name in modules:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            for bound, use in _from_targets(name, is_package, node, modules):
                yield use
                if not use.name:
                    aliases[bound] = use.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            yield Import(name, node.lineno, node.value, "")  # importlib.import_module("..."), a registry entry
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield Import(name, node.lineno, aliases[node.value.id], node.attr)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (with the sub-packages whose ``__init__`` that runs)."""
    names = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        own = set(_ancestors(m)) | ({m} if _is_package(path) else set())
        for use in imports(m, _tree(path), _is_package(path), names):
            targets = [use.module] + [a for a in _ancestors(use.module) if a != PACKAGE and a in names]
            graph[m].update(t for t in targets if t != m and t not in own)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_uses(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    names = set(modules)
    found = []
    for m, path in modules.items():
        for use in imports(m, _tree(path), _is_package(path), names):
            private = use.name.startswith("_") and not use.name.startswith("__")
            if private and use.module != m and (use.module, use.name) not in ALLOWED_PRIVATE:
                found.append(f"{path.relative_to(root)}:{use.line}: {use.module}.{use.name}")
    return sorted(set(found))


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _within(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.fixture(scope="module")
def modules():
    return package_modules()


@pytest.fixture(scope="module")
def graph(modules):
    return import_graph(modules)


def test_no_import_cycle(graph):
    assert graph["grpo_kernels.triton.linear_logprobs"] >= {"grpo_kernels.linear"}  # the graph is read at all
    assert cycles(graph) == []


def test_no_private_name_across_modules(modules):
    assert private_uses(modules) == []


def test_the_spec_imports_only_stdlib_and_torch(modules):
    for spec in SPEC:
        tree = _tree(modules[spec])
        assert {use.module for use in imports(spec, tree, False, set(modules))} <= set(SPEC)
        tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        outside = {t for t in tops - {PACKAGE} if t not in sys.stdlib_module_names and t not in ("torch", "__future__")}
        assert outside == set(), f"{spec} imports {sorted(outside)}"


def test_kernels_never_reach_the_public_api(graph):
    kernels = [m for m in graph if _within(m, KERNELS)]
    assert "grpo_kernels.triton.grpo_loss" in kernels and "grpo_kernels.native.grpo_loss" in kernels
    for m in kernels:
        bad = sorted(w for w in _reaches(graph, m) if _within(w, PUBLIC_API) or w == PACKAGE)
        assert bad == [], f"{m} reaches {bad}"


# --------------------------------------------------------------------------- #
# the checks can fail
# --------------------------------------------------------------------------- #
def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_modules(tmp_path)


def test_the_checks_find_cycles_and_private_names(tmp_path):
    modules = _fake_package(tmp_path, {
        "__init__.py": "from . import a\n",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .c import _hidden\n",  # a function-level import
        "c.py": "import importlib\nM = 'grpo_kernels.a'\n_hidden = 1\n",  # a registry string closes the cycle
        "kern/__init__.py": "",
        "kern/k.py": "from .. import d\nfrom ..d import _x\n",
        "d.py": "import grpo_kernels.c as cc\nY = cc._hidden\n",
    })
    graph = import_graph(modules)
    assert cycles(graph) == [["grpo_kernels.a", "grpo_kernels.b", "grpo_kernels.c"]]
    assert private_uses(modules, tmp_path) == [
        f"{PACKAGE}/b.py:2: grpo_kernels.c._hidden", f"{PACKAGE}/d.py:2: grpo_kernels.c._hidden",
        f"{PACKAGE}/kern/k.py:2: grpo_kernels.d._x",
    ]
    assert _reaches(graph, "grpo_kernels.kern.k") >= {"grpo_kernels.d", "grpo_kernels.c", "grpo_kernels.a"}
