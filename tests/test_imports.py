"""Import hygiene: every module imports, the import graph of edgecomp.* is acyclic (at module
level, and counting imports inside functions too), no module imports another's private name, and
the CLI starts without torch."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import edgecomp

ROOT = pathlib.Path(edgecomp.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    """Every edgecomp module (packages by their ``__init__``), by dotted name."""
    found = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = ["edgecomp", *f.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = f
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path], *,
             everywhere: bool = False) -> set[str]:
    """The edgecomp modules ``name`` imports: Import/ImportFrom statements of the module body (also
    under a top-level if/try, but not ``if TYPE_CHECKING:``, never run), and with ``everywhere``
    also those inside functions and classes at any depth (run later, but a circle through them is
    still a circle).

    ``from edgecomp.pkg import name`` counts as an import of the submodule ``edgecomp.pkg.name``
    when that is a module, else of the package ``edgecomp.pkg`` (its ``__init__``). The implicit
    import of a module's parent packages is not an edge: a package's ``__init__`` importing its own
    submodules would otherwise always be a circle."""
    out: set[str] = set()
    for target, names in _import_statements(name, path, everywhere=everywhere, type_checking=False):
        subs = [f"{target}.{a}" for a in names if f"{target}.{a}" in modules]
        out.update(subs)
        if not names or len(subs) < len(names):
            out.add(target)
    return {m for m in out if m in modules and m != name}


def _import_statements(name: str, path: pathlib.Path, *, everywhere: bool = False, type_checking: bool = True):
    """(absolute module, names imported from it) for the module's import statements: at module
    level, or ``everywhere``; those under ``if TYPE_CHECKING:`` with ``type_checking``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []

    def resolve(s: ast.ImportFrom) -> str:
        if not s.level:
            return s.module or ""
        base = package.split(".")[: len(package.split(".")) - s.level + 1]
        return ".".join(base + ([s.module] if s.module else []))

    def visit(stmts) -> None:
        for s in stmts:
            if isinstance(s, ast.Import):
                found.extend((a.name, []) for a in s.names)
            elif isinstance(s, ast.ImportFrom):
                found.append((resolve(s), [a.name for a in s.names]))
            elif isinstance(s, ast.If):
                if type_checking or not _is_type_checking(s.test):
                    visit(s.body)
                visit(s.orelse)
            elif isinstance(s, (ast.Try, getattr(ast, "TryStar", ast.Try))):
                visit(s.body)
                for h in s.handlers:
                    visit(h.body)
                visit(s.orelse)
                visit(s.finalbody)
            elif everywhere and isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.With,
                                               ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
                visit(s.body)
                visit(getattr(s, "orelse", []))
            elif everywhere and isinstance(s, ast.Match):
                for case in s.cases:
                    visit(case.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _top_level_imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    return _imports(name, path, modules)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_every_module_imports_in_a_fresh_interpreter():
    code = (
        "import json, pkgutil, importlib, edgecomp\n"
        "bad = {}\n"
        "for m in pkgutil.walk_packages(edgecomp.__path__, 'edgecomp.', onerror=lambda n: bad.setdefault(n, 'walk')):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as e:\n"
        "        bad[m.name] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    bad = json.loads(out.stdout.strip().splitlines()[-1])
    assert not bad, f"modules that do not import: {bad}"


def test_module_level_import_graph_is_acyclic():
    modules = _modules()
    graph = {name: _top_level_imports(name, path, modules) for name, path in modules.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_import_graph_with_function_level_imports_is_acyclic():
    """Imports inside functions count: a circle hidden in a lazy import is still two modules that
    each need the other."""
    modules = _modules()
    graph = {name: _imports(name, path, modules, everywhere=True) for name, path in modules.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


def test_no_private_name_is_imported_across_modules():
    """``from edgecomp.x import _name`` reaches into another module's internals: make the name
    public or move it where both modules can use it (shared graph helpers: edgecomp.graph)."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, names in _import_statements(name, path, everywhere=True, type_checking=True):
            if target == "edgecomp" or target.startswith("edgecomp."):
                bad += [f"{name}: from {target} import {a}" for a in names
                        if a.startswith("_") and not a.startswith("__") and f"{target}.{a}" not in modules]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_leaf_modules_import_no_edgecomp_module():
    """The quantization parameter math and the loss statistics are leaves: every module can use
    them without a path back (numpy and the standard library only)."""
    modules = _modules()
    for leaf in ("edgecomp.quantize.qparams", "edgecomp.measure.metrics", "edgecomp.errors"):
        assert _imports(leaf, modules[leaf], modules, everywhere=True) == set(), leaf


def test_function_level_imports_are_seen(tmp_path):
    """The walk finds imports nested in functions, methods, branches and with-blocks, resolves
    relative ones, and maps ``from pkg import submodule`` to the submodule."""
    src = tmp_path / "m.py"
    src.write_text(
        "import edgecomp.a\n"
        "def f():\n"
        "    from .b import thing\n"
        "class C:\n"
        "    def g(self):\n"
        "        if True:\n"
        "            with open('x'):\n"
        "                from edgecomp.pkg import sub, value\n"
        "if TYPE_CHECKING:\n"
        "    from edgecomp.c import T\n", encoding="utf-8")
    modules = {m: src for m in ("edgecomp.a", "edgecomp.b", "edgecomp.c", "edgecomp.pkg", "edgecomp.pkg.sub")}
    assert _imports("edgecomp.m", src, modules) == {"edgecomp.a"}
    assert _imports("edgecomp.m", src, modules, everywhere=True) == {
        "edgecomp.a", "edgecomp.b", "edgecomp.pkg", "edgecomp.pkg.sub"}
    assert ("edgecomp.c", ["T"]) in _import_statements("edgecomp.m", src, type_checking=True)
    only_sub = tmp_path / "n.py"
    only_sub.write_text("from edgecomp.pkg import sub\n", encoding="utf-8")
    assert _imports("edgecomp.n", only_sub, modules) == {"edgecomp.pkg.sub"}


def test_find_cycle_names_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_cli_does_not_import_torch():
    code = "import sys, edgecomp.cli\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", "import edgecomp.cli imported torch"
