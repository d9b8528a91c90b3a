"""What earlier migrations recorded: the latest ``op.backfill_counter()`` of each counter.

Autogenerate reads the ``upgrade()`` of the revisions from head down to
base (their source, with :mod:`ast`, never running them) and keeps, per
counter column, the arguments of the last ``op.backfill_counter(table,
column, ...)`` call found. Its ``where=`` / ``sum=`` tell whether a
counter's definition changed; all of its arguments let the downgrade of a
migration restore the previous definition's values (a changed counter
backfilled again with them, a removed counter re-added and backfilled).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["UNKNOWN", "RecordedBackfill", "recorded_backfills", "recorded_calls"]

#: An argument that is not a literal: compares unequal (a new backfill is
#: safe) and cannot be written into a downgrade.
UNKNOWN = "<not a literal>"

#: The keyword arguments of ``op.backfill_counter()``, with their defaults.
_KEYWORDS: dict[str, Any] = {
    "where": None, "sum": None, "parent_key": None, "schema": None, "shards": False, "through": None,
}
_POSITIONAL = ("table_name", "column_name", "child_table", "child_fk")

Key = tuple[str | None, str, str]


@dataclass(frozen=True)
class RecordedBackfill:
    """One ``op.backfill_counter(...)`` call of a migration's ``upgrade()``."""

    key: Key
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def definition(self) -> tuple[Any, Any]:
        """``(where, sum)`` as written (``None`` when absent)."""
        return self.kwargs["where"], self.kwargs["sum"]

    @property
    def literal(self) -> bool:
        """Every argument is a literal: the call can be written again."""
        values = [*self.args, *self.kwargs.values()]
        return all(not isinstance(v, str) or v != UNKNOWN for v in values)


def recorded_backfills(autogen_context: AutogenContext) -> dict[Key, RecordedBackfill]:
    """``{(schema, table, column): call}``: the latest backfill of each counter."""
    found: dict[Key, RecordedBackfill] = {}
    for call in recorded_calls(autogen_context):  # latest first
        found.setdefault(call.key, call)
    return found


def recorded_calls(autogen_context: AutogenContext, name: str = "backfill_counter",
                   keywords: dict[str, Any] | None = None) -> list[RecordedBackfill]:
    """Every ``op.<name>(table, column, ...)`` call of the upgrades, latest first
    (``keywords``: its keyword arguments with their defaults)."""
    script = getattr(autogen_context.migration_context, "script", None)
    found: list[RecordedBackfill] = []
    if script is None:  # compare_metadata() outside a script directory
        return found
    for revision in script.walk_revisions():  # from the heads down to base
        try:
            with open(revision.path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):  # pragma: no cover - a .pyc-only revision
            continue
        calls: list[RecordedBackfill] = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "upgrade":
                calls.extend(_backfill_calls(node, name, _KEYWORDS if keywords is None else keywords))
        found.extend(reversed(calls))  # the last call of a revision wins
    return found


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return UNKNOWN


def _backfill_calls(fn: ast.FunctionDef, name: str, keywords: dict[str, Any]) -> list[RecordedBackfill]:
    calls = []
    for node in ast.walk(fn):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == name
            and len(node.args) >= 2
        ):
            continue
        given = dict(zip(_POSITIONAL, (_literal(a) for a in node.args)))
        kwargs = dict(keywords)
        for k in node.keywords:
            if k.arg in _POSITIONAL:  # a positional argument given by name
                given[k.arg] = _literal(k.value)
            elif k.arg in kwargs:
                kwargs[k.arg] = _literal(k.value)
        args = tuple(given.get(name, UNKNOWN) for name in _POSITIONAL)
        if UNKNOWN in args[:2]:
            continue
        key = (kwargs["schema"], args[0], args[1])
        calls.append(((node.lineno, node.col_offset), RecordedBackfill(key, args, kwargs)))
    # ast.walk is breadth-first: put the calls back in source order
    return [call for _, call in sorted(calls, key=lambda c: c[0])]
