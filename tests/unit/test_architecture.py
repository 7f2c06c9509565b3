"""The package's shape, checked: no import cycles, and a core that loads no aiohttp."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mirrorproxy"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports when it runs (lazy imports in
    functions count; ``if TYPE_CHECKING:`` blocks do not: they never execute)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return (found & modules) - {own}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _runtime_imports(path, modules) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 50  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "module",
    [
        "mirrorproxy.core.oci",
        "mirrorproxy.core.errors",
        "mirrorproxy.core.namespaces",
        "mirrorproxy.core.reference",
        "mirrorproxy.core.units",
        "mirrorproxy.core.singleflight",
        "mirrorproxy.core.tuning",
        "mirrorproxy.core.rendezvous",
        "mirrorproxy.cache.blobs",
        "mirrorproxy.cache.manifests",
        "mirrorproxy.cache.stores",
    ],
)
def test_the_core_and_the_stores_load_no_aiohttp(module: str) -> None:
    code = f"import sys, {module}; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_core_module_imports_outside_the_core_but_config() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("mirrorproxy.core"):
            outside = {
                d for d in deps if not d.startswith(("mirrorproxy.core", "mirrorproxy.config"))
            }
            assert outside == set(), name


def test_modules_stay_small_or_say_why() -> None:
    """None over 400 lines; over 300 only with the reason in the module docstring."""
    too_long, unexplained = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 400:
            too_long.append(f"{path.relative_to(PACKAGE)}: {lines}")
        elif lines > 300 and "Over 300 lines" not in doc:
            unexplained.append(f"{path.relative_to(PACKAGE)}: {lines}")
    assert too_long == []
    assert unexplained == []
