#!/usr/bin/env python3
"""The package's shape: its runtime import cycles and its module sizes.

``python tests/shape.py`` prints the strongly connected components of the
import graph of ``countercache/`` (or "none") and every module's line count,
largest first. Standard library only. Every ``from ... import`` counts,
imports inside functions included; only those under ``if TYPE_CHECKING:``
do not (see ARCHITECTURE.md: no cycles, no module over ~400 lines).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "countercache"
MAX_LINES = 400


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _typing_only(tree: ast.AST) -> set[int]:
    """Ids of the nodes under an ``if TYPE_CHECKING:`` (its test naming TYPE_CHECKING)."""
    return {id(node) for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
            for node in ast.walk(branch)}


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at run time."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text(), str(path))
        skip = _typing_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)] + ([node.module] if node.module else [])
                    base_name = ".".join(base)
                else:
                    base_name = node.module or ""
                targets = [f"{base_name}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def sizes(mods: dict[str, Path]) -> list[tuple[int, str]]:
    """``(lines, module)``, largest first."""
    return sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), key=lambda x: (-x[0], x[1]))


def main() -> int:
    mods = modules()
    found = cycles(imports(mods))
    print("import cycles:", "none" if not found else "")
    for component in found:
        print(f"  {len(component)} modules: {', '.join(component)}")
    print(f"module sizes (lines; at most {MAX_LINES}):")
    for lines, name in sizes(mods):
        print(f"  {lines:5d}  {name}{'  <- too long' if lines > MAX_LINES else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
