"""The package's shape: no import circle in ``distill/`` (function-level imports included), and the library
never imports the service layers."""

from __future__ import annotations

import ast
from pathlib import Path

DISTILL = Path(__file__).resolve().parents[1] / "distill"


def _module_name(path: Path) -> str:
    parts = path.relative_to(DISTILL.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The distill modules ``path`` imports anywhere in its body (``from distill.x import y`` counts as
    ``distill.x.y`` when that is a module, else ``distill.x``); package ``__init__`` edges are ignored."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules and not (DISTILL.parent / name.replace(".", "/") / "__init__.py").exists():
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in DISTILL.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_hidden_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_distill_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "distill.steps" in graph and "distill.backends" in graph["distill.steps"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_library_never_imports_the_service_layers() -> None:
    for path in DISTILL.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("service", "workers") for n in names), path


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_the_workers_and_the_service_core_never_import_the_http_layer() -> None:
    """``workers/`` and every ``service`` module outside ``service/api/`` work without FastAPI's routers:
    a worker's tick starts jobs through ``service.submit``, not through a route."""
    root = DISTILL.parent
    paths = [*(root / "workers").rglob("*.py"), *(p for p in (root / "service").glob("*.py"))]
    assert any(p.name == "schedules.py" for p in paths)
    for path in paths:
        bad = {n for n in _imported_modules(path) if n == "service.api" or n.startswith("service.api.")}
        assert not bad, f"{path.relative_to(root)} imports {sorted(bad)}"
