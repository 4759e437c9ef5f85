"""The house rules of the code, checked on the source: layers, import loops, module and
function sizes (README's "Layout" section says why)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "api", "worker", "cli")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``name`` imports, anywhere in the file (deferred imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                )
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_loops() -> None:
    # A package's __init__ re-exporting its own modules is not a loop between rooms.
    graph = {
        name: {t for t in targets if not (name in t.split(".") and t.startswith(name + "."))}
        for name, targets in _graph().items()
    }
    assert _cycles(graph) == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [("core", ("api", "worker", "cli")), ("cli", ("api", "worker")), ("worker", ("api", "cli"))],
)
def test_layers_import_only_downwards(layer: str, forbidden: tuple[str, ...]) -> None:
    wrong = {
        (name, target)
        for name, targets in _graph().items()
        if name.split(".")[0] == layer
        for target in targets
        if target.split(".")[0] in forbidden
    }
    assert wrong == set()


def test_no_route_module_imports_another() -> None:
    wrong = {
        (name, target)
        for name, targets in _graph().items()
        if name.startswith("api.routes.")
        for target in targets
        if target.startswith("api.routes.")
    }
    assert wrong == set()


def test_modules_are_small() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_functions_are_short() -> None:
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = length
    assert long == {}


def test_the_checks_see_a_loop_and_a_long_module(tmp_path: Path) -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    (tmp_path / "m.py").write_text("from core import x\nimport core.y\n")
    assert _imports(tmp_path / "m.py", "core.m", {"core", "core.x", "core.y"}) == {
        "core",
        "core.x",
        "core.y",
    }


def test_every_project_import_resolves_deferred_ones_too() -> None:
    """Imports inside functions (kept lazy so the API never loads torch) run only on the path
    that needs them: a moved module breaks them silently until then. Check each one here."""
    import importlib

    broken = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] not in PACKAGES:
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                broken.append(f"{name}: {node.module} ({exc})")
                continue
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    broken.append(f"{name}: {node.module}.{alias.name}")
    assert broken == []
