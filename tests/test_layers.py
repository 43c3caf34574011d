"""The dependency direction of the packages, kept by a test: ``common`` <- ``actors`` <- ``env_workers`` <-
``learner`` (whose ``cli`` is the top), and no import cycle between modules.

``env_workers`` may use ``actors`` for one thing: the LLM judge (``env_workers.judge``) runs the generation
engine; nothing in ``actors`` knows the environment (the rollout worker talks to env workers through
their actor handles).

Every ``import`` counts, at module level or inside a function: a function-level import hides a cycle from
Python's loader, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "env_workers", "actors", "learner")
ALLOWED = {  # package -> the first-party packages it may import
    "common": {"common"},
    "env_workers": {"common", "actors", "env_workers"},
    "actors": {"common", "actors"},
    "learner": {"common", "env_workers", "actors", "learner"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """First-party modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod`` when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                while name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in modules:
                    out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_packages_import_only_downwards():
    wrong = sorted(f"{m} imports {d}" for m, deps in _graph().items() for d in deps
                   if d.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not wrong, "imports against the direction common <- actors <- env_workers <- learner:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other (directly or in a ring): {cycles}"
