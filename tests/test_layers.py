"""The layers are true (docs/architecture.md, "Layers").

Every module of the project's packages is read with ``ast`` (imports at any
depth, inside functions too) and checked against four rules:

(a) a module imports only from its own package or from a lower layer;
    packages in the same layer never import each other;
(b) there is no import cycle between packages;
(c) the core (``oms``) does no I/O: no sockets, threads, processes, signals,
    files, environment, sleeping clocks, Prometheus, pykka, ZeroMQ or LMDB;
(d) no module is over 400 lines.

Each failure names the module, the line and the rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS = {
    "oms": 0,  # the pure domain core
    "storage": 1,  # the storage boundary: LMDB store, archive files
    "actors": 2,  # the actor runtime and the actors; metrics, logs, settings
    "gateways": 3,  # everything that speaks the wire to another system
    "bench": 4, "console": 4, "shards": 4,  # tools: never each other, never app
    "app": 5,  # the composition root and the commands
}

CORE_FORBIDDEN = {"zmq", "lmdb", "pykka", "threading", "socket", "subprocess", "signal",
                  "multiprocessing", "select", "selectors", "asyncio", "prometheus_client",
                  "urllib", "http", "shutil"}
CORE_FORBIDDEN_USES = {("os", "environ"), ("os", "getenv"), ("os", "putenv"),
                       ("time", "sleep")}

# Core modules allowed one named import from CORE_FORBIDDEN, and why.
CORE_EXCEPTIONS = {
    # one msgpack Packer per thread (threading.local): no thread is made (owner: perf)
    ("oms/codec.py", "threading"),
}

MAX_LINES = 400


def modules() -> Iterator[tuple[str, str, ast.Module, str]]:
    """(path relative to the root, package, tree, source) of every module."""
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            rel = path.relative_to(ROOT).as_posix()
            yield rel, package, ast.parse(source, rel), source


def imports(tree: ast.Module, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted module name) of every import, at any depth; a relative
    import is an import from the module's own package; ``__import__("x")``
    and ``import_module("x")`` with a literal name count too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, package
            elif node.module:
                yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and _called(node) in {"__import__", "import_module"}
              and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, str(node.args[0].value)


def _called(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else (
        func.attr if isinstance(func, ast.Attribute) else "")


def test_imports_go_down_the_layers_only() -> None:
    """Rule (a): a module imports its own package or a lower layer."""
    problems = []
    for rel, package, tree, _ in modules():
        for line, name in imports(tree, package):
            top = name.split(".")[0]
            if top not in LAYERS or top == package:
                continue
            if LAYERS[top] > LAYERS[package]:
                problems.append(f"{rel}:{line}: imports {name}: rule (a), {top} (layer "
                                f"{LAYERS[top]}) is above {package} (layer {LAYERS[package]})")
            elif LAYERS[top] == LAYERS[package]:
                problems.append(f"{rel}:{line}: imports {name}: rule (a), {top} and {package} "
                                f"are siblings in layer {LAYERS[package]}")
    assert not problems, "\n".join(problems)


def package_graph() -> dict[str, dict[str, str]]:
    """package -> {imported package: the first place that imports it}."""
    graph: dict[str, dict[str, str]] = {p: {} for p in LAYERS}
    for rel, package, tree, _ in modules():
        for line, name in imports(tree, package):
            top = name.split(".")[0]
            if top in LAYERS and top != package:
                graph[package].setdefault(top, f"{rel}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first walk (each once)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == path[0]:
                if frozenset(path) not in seen:
                    seen.add(frozenset(path))
                    found.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for start in sorted(graph):
        walk([start])
    return found


def test_no_import_cycle_between_packages() -> None:
    """Rule (b)."""
    graph = package_graph()
    problems = [" -> ".join(cycle) + ": rule (b), an import cycle between packages ("
                + ", ".join(f"{a} at {graph[a][b]}" for a, b in pairwise(cycle))
                + ")" for cycle in cycles(graph)]
    assert not problems, "\n".join(problems)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1"}, "d": {}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": "x"}, "b": {}}) == []


def core_problems(rel: str, tree: ast.Module) -> Iterator[str]:
    for line, name in imports(tree, "oms"):
        top = name.split(".")[0]
        if top in CORE_FORBIDDEN and (rel, top) not in CORE_EXCEPTIONS:
            yield f"{rel}:{line}: imports {name}: rule (c), the core does no I/O"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in CORE_FORBIDDEN_USES):
            yield (f"{rel}:{node.lineno}: uses {node.value.id}.{node.attr}: rule (c), "
                   "the core does no I/O")
        elif isinstance(node, ast.ImportFrom) and node.module in {"os", "time"}:
            for alias in node.names:
                if (node.module, alias.name) in CORE_FORBIDDEN_USES:
                    yield (f"{rel}:{node.lineno}: imports {node.module}.{alias.name}: "
                           "rule (c), the core does no I/O")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "open"):
            yield f"{rel}:{node.lineno}: calls open(): rule (c), the core does no I/O"


def test_the_core_does_no_io() -> None:
    """Rule (c)."""
    problems = [p for rel, package, tree, _ in modules() if package == "oms"
                for p in core_problems(rel, tree)]
    assert not problems, "\n".join(problems)


def test_the_core_check_catches_io() -> None:
    source = ("import os\nimport zmq.asyncio\nfrom os import environ\n"
              "def f():\n    import threading\n    os.environ['X']\n    open('f')\n"
              "    __import__('socket')\n    importlib.import_module('lmdb')\n")
    found = list(core_problems("oms/x.py", ast.parse(source)))
    assert sorted(int(p.split(":")[1]) for p in found) == [2, 3, 5, 6, 7, 8, 9], found


def test_no_module_over_400_lines() -> None:
    """Rule (d), with no exception."""
    problems = [f"{rel}:{MAX_LINES + 1}: {len(source.splitlines())} lines: rule (d), at most "
                f"{MAX_LINES} lines a module"
                for rel, _, _, source in modules() if len(source.splitlines()) > MAX_LINES]
    assert not problems, "\n".join(problems)


def test_every_package_is_in_a_layer() -> None:
    """A new top-level package must be given a layer here (and in the docs)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(LAYERS), sorted(packages ^ set(LAYERS))
