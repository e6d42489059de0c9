"""The layout's rules, checked on the source (AST only: nothing is imported or executed).

- no import cycle between modules anywhere in the five packages, counting imports inside functions,
  under ``TYPE_CHECKING`` and through packages' ``__init__`` re-exports;
- nothing outside ``fleet/cli/`` imports the CLI;
- ``tiling/`` and ``scheduler/`` import no Ray, zeroconf or socket (pure rooms);
- ``workers/`` does not import ``sims`` (a worker is handed its emulation);
- only the CLI prints (and the benchmark scripts run as ``python -m``, listed below);
- no module over 600 lines, no function over 80 lines unless listed below with its reason.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fleet", "tiling", "scheduler", "workers", "sims")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# modules outside fleet/cli/ that may call print(): scripts run as `python -m`, whose output is the point
PRINTING_SCRIPTS = {"sims.perf": "python -m sims.perf", "fleet.serving.overhead": "python -m fleet.serving.overhead"}
# function (module:qualname) -> why it may be longer than MAX_FUNCTION_LINES
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


@functools.cache
def _tree(mod: str) -> ast.Module:
    """A module's syntax tree, parsed once for all the checks below."""
    return ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _imports(mod: str) -> Iterator[tuple[str, int]]:
    """Every module ``mod`` imports (absolute names), with the line, wherever the import statement is."""
    tree = _tree(mod)
    pkg = mod if _is_package(mod) else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = pkg.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base, node.lineno
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    yield sub, node.lineno


def _targets(mod: str, name: str) -> list[str]:
    """The project modules an import of ``name`` runs: the module and, from outside them, its packages."""
    parts = name.split(".")
    out = []
    for k in range(1, len(parts) + 1):
        target = ".".join(parts[:k])
        if target not in MODULES or target == mod:
            continue
        inside = mod == target or mod.startswith(target + ".")
        if k == len(parts) or not inside:
            out.append(target)
    return out


def _graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for mod in MODULES:
        for name, line in _imports(mod):
            for target in _targets(mod, name):
                graph[mod].setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_checker_sees_cycles_and_packages() -> None:
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
    assert "tiling.plan" in MODULES and "fleet" in MODULES
    assert _targets("workers.executor", "tiling.geometry") == ["tiling", "tiling.geometry"]
    assert _targets("tiling.plan", "tiling.geometry") == ["tiling.geometry"]


def test_no_import_cycles() -> None:
    graph = _graph()
    problems = []
    for comp in _cycles(graph):
        edges = [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in graph[a] if b in comp]
        problems.append("cycle: " + "; ".join(edges))
    assert not problems, "\n".join(problems)


def test_nothing_imports_the_cli() -> None:
    bad = [f"{m} imports {t}" for m, targets in _graph().items() if not (m == "fleet.cli" or m.startswith("fleet.cli."))
           for t in targets if t == "fleet.cli" or t.startswith("fleet.cli.")]
    assert not bad, bad


def test_only_the_cli_prints() -> None:
    bad = []
    for mod, path in MODULES.items():
        if mod == "fleet.cli" or mod.startswith("fleet.cli.") or mod in PRINTING_SCRIPTS:
            continue
        for node in ast.walk(_tree(mod)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: print() outside the CLI (return or raise it)")
    assert not bad, bad
    assert set(PRINTING_SCRIPTS) <= set(MODULES), set(PRINTING_SCRIPTS) - set(MODULES)


@pytest.mark.parametrize("room,forbidden", [("tiling", ("ray", "zeroconf", "socket")),
                                            ("scheduler", ("ray", "zeroconf", "socket", "torch")),
                                            ("workers", ("sims", "fleet", "zeroconf"))])
def test_rooms_stay_pure(room: str, forbidden: tuple[str, ...]) -> None:
    bad = []
    for mod in MODULES:
        if mod.split(".")[0] != room:
            continue
        for name, line in _imports(mod):
            if name.split(".")[0] in forbidden:
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {name}")
    assert not bad, bad


def test_module_and_function_sizes() -> None:
    problems = []
    for mod, path in MODULES.items():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_MODULE_LINES:
            problems.append(f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_MODULE_LINES}): split it by idea")
        for node, qual in _functions(_tree(mod)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            key = f"{mod}:{qual}"
            if length > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {qual}: {length} lines")
    assert not problems, "\n".join(problems)


def test_listed_long_functions_exist() -> None:
    found = set()
    for mod in MODULES:
        for _node, qual in _functions(_tree(mod)):
            found.add(f"{mod}:{qual}")
    assert set(LONG_FUNCTIONS) <= found, set(LONG_FUNCTIONS) - found


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, prefix + node.name
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def test_the_cli_starts_without_torch_or_ray() -> None:
    """`tilefleet stop`, `leave` or `devices` answer in a fraction of a second: torch and Ray
    (1-2 s to import) load only in the commands that compute or connect."""
    code = ("import sys; import fleet.cli.main; "
            "print(sorted(m for m in ('torch', 'ray', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
