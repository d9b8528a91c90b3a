"""A counter's triggers from plain arguments: tables and SQL text (private).

What a migration records of a counter (``op.create_counter_trigger``): the
names of its tables and keys, and ``where=`` / ``sum=`` as SQL text over the
child table's columns, as :attr:`CounterCache.where_sql` renders them
(``questions.state = 'open'``). :class:`TextCounter` stands for the resolved
counter in :mod:`countercache.triggers`, which then generates the same DDL
as for the declaration: the text is cut into its pieces, and every reference
to a child column (``questions.state``, ``"questions"."state"``, or a bare
``state``) becomes that column, which the generator re-points to the
trigger's row (``NEW.state``). String literals and quoted identifiers are
read whole (a ``questions.x`` inside ``'...'`` stays text); a reference
to another table's column (``users.name``) is kept as such, so that
:func:`countercache.triggers.refusal` refuses it as it refuses a declared
condition over another table.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Column, Table, literal, literal_column
from sqlalchemy import table as table_clause
from sqlalchemy import column as column_clause
from sqlalchemy.sql.elements import ClauseList

from .errors import ConfigurationError

__all__ = ["TextCounter", "expression"]

_TOKENS = {
    # (MariaDB/MySQL: a backslash escapes the next character in a string literal)
    True: re.compile(r"""'(?:[^'\\]|''|\\.)*'|"(?:[^"]|"")*"|`(?:[^`]|``)*`|[A-Za-z_][A-Za-z0-9_$]*|\s+|.""", re.S),
    False: re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`(?:[^`]|``)*`|[A-Za-z_][A-Za-z0-9_$]*|\s+|.""", re.S),
}


def _identifier(token: str) -> tuple[str, bool] | None:
    """``(name, quoted)`` when ``token`` is an identifier, else None."""
    if token[0] in "\"`" and len(token) > 1:
        return token[1:-1].replace(token[0] * 2, token[0]), True
    if token[0].isalpha() or token[0] == "_":
        return token, False
    return None


def _same(name: tuple[str, bool], wanted: str) -> bool:
    return name[0] == wanted if name[1] else name[0].lower() == wanted.lower()


def expression(sql: str, child: Table, backslashes: bool = False, add_missing: bool = False) -> Any:
    """``sql`` as an expression whose references to ``child``'s columns are those columns
    (``add_missing``: a qualified reference to a column ``child`` lacks adds it, untyped:
    offline, where the tables are not reflected)."""
    tokens = _TOKENS[backslashes].findall(sql)
    parts: list[Any] = []
    pending: list[str] = []
    i = 0
    while i < len(tokens):
        name = _identifier(tokens[i])
        if name is None or tokens[i][0] == "'":
            pending.append(tokens[i])
            i += 1
            continue
        chain = [name]
        j = i + 1
        while j + 1 < len(tokens) and tokens[j] == "." and _identifier(tokens[j + 1]) is not None \
                and tokens[j + 1][0] != "'":
            chain.append(_identifier(tokens[j + 1]))  # type: ignore[arg-type]
            j += 2
        following = next((t for t in tokens[j:] if not t.isspace()), "")
        found = _column(chain, child, following, add_missing)
        if found is None:
            pending.extend(tokens[i:j])
        else:
            if "".join(pending).strip():  # (the pieces are joined by a space)
                parts.append(literal_column("".join(pending).strip()))
            pending = []
            parts.append(found)
        i = j
    if "".join(pending).strip():
        parts.append(literal_column("".join(pending).strip()))
    return ClauseList(*parts, operator=None, group=False)


def _column(chain: list[tuple[str, bool]], child: Table, following: str, add_missing: bool) -> Any:
    """The column ``chain`` (``[schema.]table.column`` or a bare column name) refers to, if any."""
    if len(chain) == 1:
        if following == "(" or chain[0][1] is False and chain[0][0].upper() in ("TRUE", "FALSE", "NULL"):
            return None
        return next((c for c in child.columns if _same(chain[0], c.name)), None)
    *qualifier, table_name, name = chain
    if _same(table_name, child.name) and (not qualifier or child.schema is None or _same(qualifier[-1], child.schema)):
        for col in child.columns:
            if _same(name, col.name):
                return col
        if add_missing:
            child.append_column(Column(name[0]))
            return child.c[name[0]]
        raise ConfigurationError(f"{child.name} has no column {name[0]!r} (in a counter's where=/sum= text)")
    # another table's column: kept, so that the trigger strategy refuses it
    return table_clause(table_name[0], column_clause(name[0]), schema=qualifier[-1][0] if qualifier else None).c[name[0]]


class _Kind:
    def __init__(self, fks: list[Any], condition: Any, value: Any) -> None:
        self._fks, self._condition, self._value = fks, condition, value

    def key_columns(self) -> list[Any]:
        return self._fks

    def condition(self) -> Any:
        return self._condition

    def row_value(self) -> Any:
        return self._value


class _Through:
    """A multi-level counter's kind: the leaves (``leaf``) of the middle rows whose ``fk`` holds the parent's key."""

    def __init__(self, fk: Any, leaf: _Kind, middle_key: Any) -> None:
        self._fk, self.leaf, self._middle_key = fk, leaf, middle_key

    def key_columns(self) -> list[Any]:
        return [self._fk]

    def middle_key(self) -> list[Any]:
        return [self._middle_key]

    def middle_condition(self) -> Any:
        return None

    def condition(self) -> Any:
        return self.leaf.condition()

    def row_value(self) -> Any:
        return self.leaf.row_value()


class _Mapper:
    def __init__(self, primary_key: list[Any]) -> None:
        self.primary_key = primary_key


class TextCounter:
    """A counter as a migration records it: ``parent.c[column]`` counts the rows
    of ``child`` whose ``fks`` equal the parent's ``keys`` (in that order),
    matching ``where`` and weighing ``sum`` (SQL text), like a resolved
    :class:`~countercache.declaration.CounterCache` for the trigger generator;
    kept by ``strategy`` (``"trigger"``, or ``"sharded_trigger"`` over ``shards``
    shard rows, whose side table must then be in ``parent``'s metadata)."""

    def __init__(self, parent: Table, column: str, child: Table, fks: tuple[str, ...], keys: tuple[str, ...],
                 where: str | None = None, sum: str | None = None, backslashes: bool = False,
                 add_missing: bool = False, strategy: str = "trigger", shards: int | None = None,
                 through: tuple[Table, str, str] | None = None) -> None:
        missing = [f"{t.name}.{n}" for t, names in ((parent, (column, *keys)), (child, fks),
                                                     *(((through[0], through[1:]),) if through else ()))
                   for n in names if n not in t.c]
        if missing:
            raise ConfigurationError(f"{parent.name}.{column}: no column {', '.join(missing)} in the database")
        self.name = f"{parent.name}.{column}"
        self.relationship = child.name
        self.column = parent.c[column]
        self.where_sql, self.sum_sql = where, sum
        condition = None if where is None else expression(where, child, backslashes, add_missing)
        value = literal(1) if sum is None else expression(sum, child, backslashes, add_missing)
        self.kind: Any = _Kind([child.c[n] for n in fks], condition, value)
        if through is not None:  # (a multi-level counter: ``child`` holds the leaves of ``through``'s table)
            middle, middle_key, middle_fk = through
            self.kind = _Through(middle.c[middle_fk], self.kind, middle.c[middle_key])
            self.relationship = f"{middle.name}.{child.name}"
        self.mapper = _Mapper([parent.c[n] for n in keys])
        self._strategy, self._shards = strategy, shards

    def strategy(self) -> str:
        """``"trigger"`` or ``"sharded_trigger"`` (what the migration says)."""
        return self._strategy

    def shards(self) -> int | None:
        """``sharded_trigger``'s shard count (part of the trigger names)."""
        return self._shards
