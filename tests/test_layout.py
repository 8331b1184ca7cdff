"""The package's layering, read from the source: the library (gradstats/ and gradstats/models/)
never imports the tools (gradstats/tools/), and no module imports, directly or through others, a
module that imports it back. Lazy imports inside functions count: they are imports all the same."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gradstats"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The gradstats modules an ``import from`` statement reads (the package itself, or the
    submodules it names when they are modules of ours)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the gradstats modules it imports (module level and inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                candidates = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c in files and c != name)
        graph[name] = targets
    return graph


def _is_tool(module: str) -> bool:
    return (
        module == "gradstats.tools" or module.startswith("gradstats.tools.") or module == "gradstats.__main__"
    )


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "gradstats.modules" in graph and "gradstats.tools.cli" in graph
    assert "gradstats.ops" in graph["gradstats.modules"]  # a relative import resolved
    assert "gradstats.tools.bench.cli" in graph["gradstats.tools.cli"]  # `from .bench import cli`


def test_the_library_never_imports_a_tool():
    upward = {
        (m, t) for m, targets in import_graph().items() if not _is_tool(m) for t in targets if _is_tool(t)
    }
    assert not upward, f"library modules importing tools: {sorted(upward)}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles():
    # A package's __init__ re-exporting its submodules is the one allowed back edge: the
    # submodules may import siblings through it only by naming the sibling module.
    graph = {
        m: {t for t in targets if not (m.startswith(t + ".") and t != m)}
        for m, targets in import_graph().items()
    }
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycle(graph) == expected
