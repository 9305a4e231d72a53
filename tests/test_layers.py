"""The package's layers, read from the sources' import statements (no import is executed).

The Airflow side (hooks, operators, sensors, triggers, links, plugins) talks to Ray over HTTP and
never imports the runtime; the runtime never imports Airflow; the lower layers a runtime uses
(sandbox, llm, names, errors) never import it back; and no module-level imports form a circle.
Imports under `if TYPE_CHECKING:` are types only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "matrix_provider"
AIRFLOW_SIDE = ("hooks", "operators", "sensors", "triggers", "links", "plugins")
RUNTIME_SIDE = ("runtime", "llm", "sandbox", "pipelines", "dedup")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module, module: str) -> set[str]:
    """Modules imported when `module` runs, anywhere but under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    """Every module's imports, function-level ones too: a lazy import that dodges a circle is one."""
    return {
        _module(path): _runtime_imports(ast.parse(path.read_text()), _module(path)) for path in PACKAGE.rglob("*.py")
    }


def _in(module: str, folders: tuple[str, ...]) -> bool:
    return any(module == f"matrix_provider.{f}" or module.startswith(f"matrix_provider.{f}.") for f in folders)


def test_the_airflow_side_and_the_runtime_never_import_each_other() -> None:
    graph = _graph()
    crossings = {
        module: sorted(
            i
            for i in imports
            if (_in(module, AIRFLOW_SIDE) and _in(i, RUNTIME_SIDE))
            or (_in(module, RUNTIME_SIDE) and (i == "airflow" or i.startswith("airflow.") or _in(i, AIRFLOW_SIDE)))
        )
        for module, imports in graph.items()
    }
    assert not {m: c for m, c in crossings.items() if c}


def test_lower_layers_never_import_the_runtime() -> None:
    graph = _graph()
    upward = {
        module: sorted(i for i in imports if _in(i, ("runtime",)))
        for module, imports in graph.items()
        if _in(module, ("sandbox", "llm")) or module in ("matrix_provider.names", "matrix_provider.errors")
    }
    assert not {m: u for m, u in upward.items() if u}


def test_no_import_circle() -> None:
    graph = {m: {i for i in imports if i in _graph_modules()} for m, imports in _graph().items()}
    circles = []
    for start in graph:  # a depth-first search from each module for a path back to it
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    # A package's __init__ importing its own submodules is not a circle worth naming.
    circles = [c for c in circles if not all(p.startswith(c.split(" -> ")[0]) for p in c.split(" -> "))]
    assert not circles, circles[:5]


def _graph_modules() -> set[str]:
    return {_module(path) for path in PACKAGE.rglob("*.py")}
