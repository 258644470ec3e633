"""Import hygiene: every module imports, the module-level import graph of edgecomp.* is acyclic,
and the CLI starts without torch."""

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


def _top_level_imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The edgecomp modules ``name`` imports when it is imported: Import/ImportFrom statements of
    the module body (also under a top-level if/try, but not ``if TYPE_CHECKING:``), not those
    inside functions or classes."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(stmts) -> None:
        for s in stmts:
            if isinstance(s, ast.Import):
                out.update(a.name for a in s.names)
            elif isinstance(s, ast.ImportFrom):
                if s.level:
                    base = package.split(".")[: len(package.split(".")) - s.level + 1]
                    target = ".".join(base + ([s.module] if s.module else []))
                else:
                    target = s.module or ""
                out.add(target)
                out.update(f"{target}.{a.name}" for a in s.names)  # from pkg import submodule
            elif isinstance(s, ast.If):
                if not _is_type_checking(s.test):  # not run at import time
                    visit(s.body)
                visit(s.orelse)
            elif isinstance(s, ast.Try):
                visit(s.body)
                for h in s.handlers:
                    visit(h.body)
                visit(s.orelse)
                visit(s.finalbody)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in out if m in modules and m != name}


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


def test_find_cycle_names_the_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_cli_does_not_import_torch():
    code = "import sys, edgecomp.cli\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", "import edgecomp.cli imported torch"
