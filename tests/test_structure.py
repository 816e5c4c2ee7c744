"""The package's shape: no import cycle, no module importing another's private name."""

from __future__ import annotations

import ast
from pathlib import Path

import flux_async

PACKAGE = Path(flux_async.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import of a flux_async module in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("flux_async"):
                found.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("flux_async")]
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        edges = graph.setdefault(module, set())
        for target, names in _imports(path):
            # `from . import _x` names a submodule, not an attribute.
            submodules = [
                f"{target}.{n}"
                for n in names
                if (PACKAGE.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()
            ]
            edges.update(submodules or [target])
    return graph


def test_no_import_cycle() -> None:
    """The modules of flux_async import each other in one direction only."""
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == module or target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own submodules is how re-exports work.
    cycles = [c for c in cycles if not any(m == c[0].rpartition(".")[0] for m in c)]
    assert cycles == []


def test_no_module_imports_another_modules_private_names() -> None:
    """`from ._x import _y` reaches into another module's internals: never done."""
    offenders = [
        f"{_module_name(path)}: from {target} import {name}"
        for path in PACKAGE.rglob("*.py")
        for target, names in _imports(path)
        for name in names
        if name.startswith("_")
        and not name.startswith("__")
        and not (PACKAGE.parent / (f"{target}.{name}".replace(".", "/") + ".py")).exists()
    ]
    assert offenders == []


# A function counts whole, from the `def` line to the last, docstring included. A class
# counts its code: its docstrings (its own and its methods') are what every public name
# must carry, examples included, and counted they made documenting a method cost room
# its code needs. 270 lines of code is tighter than the 300 lines all told it replaced
# (the largest class then had 264 of code).
MAX_FUNCTION_LINES = 60
MAX_CLASS_CODE_LINES = 270


def _docstring_lines(tree: ast.Module) -> set[int]:
    """The line numbers of every docstring in ``tree``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                assert first.end_lineno is not None
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def test_no_function_or_class_is_too_long_to_read() -> None:
    """No function over 60 lines and no class over 270 lines of code anywhere in
    flux_async: past that a reader cannot hold one in view, and a seam is missing."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = _docstring_lines(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            span = range(node.lineno, node.end_lineno + 1)
            if isinstance(node, ast.ClassDef):
                limit, lines = MAX_CLASS_CODE_LINES, sum(1 for n in span if n not in docstrings)
            else:
                limit, lines = MAX_FUNCTION_LINES, len(span)
            if lines > limit:
                where = path.relative_to(PACKAGE.parent)
                too_long.append(f"{where}:{node.lineno} {node.name}: {lines} lines > {limit}")
    assert not too_long, "\n".join(too_long)
