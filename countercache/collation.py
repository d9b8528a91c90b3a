"""String comparisons of ``where=`` the database's way (private).

A flush evaluates ``where=`` in Python; the database compares strings under
the column's collation. They differ where the collation is not plain code
point order: MariaDB/MySQL's default ``*_ci`` collations ignore case and
trailing spaces (``'open' = 'Open ' `` is true), SQLite's ``NOCASE`` and
``RTRIM`` do so too, ``LIKE`` (``startswith()``) ignores ASCII case on SQLite
and treats ``%`` and ``_`` as wildcards everywhere, and ``<`` follows the
locale on PostgreSQL. Counting as Python compares would then disagree with
``check()``: silent drift.

Each string column a ``where=`` compares gets a :class:`Rule` for the
connection's database, looked up once per engine (MariaDB/MySQL: the
column's collation from ``information_schema``; PostgreSQL: whether the
collation is deterministic, and the database's own; SQLite: the collation
declared on the column). A comparison the rule can make in Python exactly
is made in Python (code points, ASCII case folding, trailing-space padding,
``LIKE`` as a regular expression); any other (a ``*_ci`` collation and a
non-ASCII string, an ordering under a locale) is asked of the database on
the flush's connection, once per distinct pair and flush.
"""

from __future__ import annotations

import operator
import re
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text

if TYPE_CHECKING:
    from sqlalchemy import Column
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper

__all__ = ["activate", "compare"]

#: The flush (or bulk statement) evaluating ``where=`` now: a weak reference
#: to its state, which gives the connection (``connection_for_mapper``).
_active: ContextVar[Any] = ContextVar("countercache_flush", default=None)

#: column -> {engine: Rule} (a column's collation is read once per engine)
_rules: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, Rule]] = weakref.WeakKeyDictionary()

#: Answers kept per column and engine (then forgotten, all at once).
ASKED_MAX = 4096

_ORDER = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}
_SQL_OP = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
#: MariaDB/MySQL collations (charset prefix and "nopad" removed) that compare
#: printable ASCII letters without case and every other printable ASCII
#: character as itself; "_bin" collations compare code points.
_ASCII_FOLDING = {"general_ci", "unicode_ci", "unicode_520_ci", "uca1400_ai_ci", "uca1400_as_ci",
                  "0900_ai_ci", "0900_as_ci", "swedish_ci"}
_ASCII_EXACT = {"general_cs", "0900_as_cs", "uca1400_as_cs"}


def activate(state: Any) -> None:
    """``state`` (a flush's) evaluates ``where=`` from now on in this context."""
    _active.set(weakref.ref(state))


class Rule:
    """How one column's strings compare in one database."""

    __slots__ = ("fold", "pad", "ascii_only", "ordered", "like_fold", "escape", "sql", "ask", "asked")

    def __init__(self, *, fold: bool = False, pad: bool = False, ascii_only: bool = False,
                 ordered: bool = True, like_fold: bool = False, escape: str | None = None,
                 sql: tuple[str, str] = ("", ""), ask: bool = False) -> None:
        #: case folded (ASCII letters) for equality
        self.fold = fold
        #: trailing spaces ignored (PAD SPACE)
        self.pad = pad
        #: Python is exact for printable ASCII strings only; others are asked
        self.ascii_only = ascii_only
        #: <, > in code point order (of the folded, padded strings)
        self.ordered = ordered
        #: LIKE folds ASCII case
        self.like_fold = like_fold
        #: LIKE's escape character when the statement names none
        self.escape = escape
        #: SQL around a parameter to compare it as the column: (before, after)
        self.sql = sql
        #: every comparison is asked of the database (a collation Python cannot follow)
        self.ask = ask
        #: (op, a, b, escape) -> answer, for comparisons asked of the database
        self.asked: dict[tuple[str, str, str, str | None], bool] = {}

    @property
    def exact(self) -> bool:
        """Are strings equal here only when they are equal in Python?"""
        return not (self.fold or self.pad or self.ask or self.ascii_only)

    def normal(self, value: str, connection: Any, table: Any, column: Any) -> str:
        """One spelling for every string this collation holds equal to ``value``:
        folded and trimmed where Python can, else the spelling the table stores
        (asked of the database; ``value`` itself when no row has it)."""
        if self._python(value):
            value = self._norm(value)
            return value.rstrip(" ") if self.pad else value
        key = ("row", value, table.fullname, column.name)
        found = self.asked.get(key)  # type: ignore[call-overload]
        if found is None:
            if len(self.asked) > ASKED_MAX:
                self.asked.clear()
            stored = connection.execute(select(column).where(column == value).limit(1)).scalar()
            stored = stored if stored is not None else value
            found = self.asked[key] = (  # type: ignore[index]
                self.normal(stored, connection, table, column) if self._python(stored) else "\0row:" + stored)
        return found  # type: ignore[return-value]

    def _python(self, *values: str) -> bool:
        if self.ask:
            return False
        return not self.ascii_only or all(v.isascii() and v.isprintable() for v in values)

    def _norm(self, value: str) -> str:
        return value.translate(_ASCII_LOWER) if self.fold else value

    def compare(self, op: str, a: str, b: str, connection: Any) -> bool:
        if not self._python(a, b):
            return self._ask(op, a, b, None, connection)
        a, b = self._norm(a), self._norm(b)
        if op in ("eq", "ne"):
            if self.pad:
                a, b = a.rstrip(" "), b.rstrip(" ")
            return (a == b) == (op == "eq")
        if not self.ordered:
            return self._ask(op, a, b, None, connection)
        if self.pad:  # shorter one padded with spaces ('a\t' < 'a')
            n = max(len(a), len(b))
            a, b = a.ljust(n), b.ljust(n)
        return bool(_ORDER[op](a, b))

    def like(self, a: str, pattern: str, escape: str | None, connection: Any) -> bool:
        escape = escape if escape is not None else self.escape
        if not self._python(a, pattern):
            return self._ask("like", a, pattern, escape, connection)
        if self.like_fold or self.fold:
            a, pattern = a.translate(_ASCII_LOWER), pattern.translate(_ASCII_LOWER)
        return _like_regex(pattern, escape).fullmatch(a) is not None

    def _ask(self, op: str, a: str, b: str, escape: str | None, connection: Any) -> bool:
        key = (op, a, b, escape)
        found = self.asked.get(key)
        if found is None:
            if len(self.asked) > ASKED_MAX:
                self.asked.clear()
            if connection is None:
                raise LookupError("no connection to compare strings on")
            before, after = self.sql
            if op == "like":
                sql = f"{before}:a{after} LIKE {before}:b{after}" + (" ESCAPE :e" if escape is not None else "")
            else:
                sql = f"{before}:a{after} {_SQL_OP[op]} {before}:b{after}"
            params = {"a": a, "b": b} | ({"e": escape} if escape is not None else {})
            found = self.asked[key] = bool(connection.execute(text(f"SELECT CASE WHEN {sql} THEN 1 ELSE 0 END"),
                                                              params).scalar())
        return found


def _like_regex(pattern: str, escape: str | None) -> re.Pattern[str]:
    out, chars = [], iter(pattern)
    for c in chars:
        if escape is not None and c == escape:
            out.append(re.escape(next(chars, "")))
        elif c == "%":
            out.append(".*")
        elif c == "_":
            out.append(".")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


_PLAIN = Rule()


def rule_for(column: Column[Any], connection: Connection) -> Rule:
    """The column's rule in the connection's database (looked up once per engine)."""
    rules = _rules.get(column)
    if rules is None:
        rules = _rules[column] = weakref.WeakKeyDictionary()
    found = rules.get(connection.engine)
    if found is None:
        found = rules[connection.engine] = _lookup(column, connection)
    return found


def _lookup(column: Column[Any], connection: Connection) -> Rule:
    dialect = connection.dialect.name
    declared = getattr(column.type, "collation", None)
    if dialect == "sqlite":
        name = (declared or "BINARY").upper()
        quoted = f' COLLATE "{declared}"' if declared else ""
        # (LIKE ignores ASCII case unless PRAGMA case_sensitive_like; it has no default escape)
        if name == "BINARY":
            return Rule(like_fold=True)
        if name == "NOCASE":
            return Rule(fold=True, like_fold=True)
        if name == "RTRIM":
            return Rule(pad=True, like_fold=True)
        return Rule(sql=("(", f"){quoted}"), ask=True)
    if dialect == "postgresql":
        quoted = f' COLLATE "{declared}"' if declared else ""
        sql = ("CAST(", f" AS TEXT){quoted}")
        if declared:
            deterministic = connection.execute(text(
                "SELECT collisdeterministic FROM pg_collation WHERE collname = :n"), {"n": declared}).scalar()
            byte_order = declared in ("C", "POSIX", "ucs_basic")
        else:
            deterministic = True
            byte_order = connection.execute(text(
                "SELECT datcollate FROM pg_database WHERE datname = current_database()")).scalar() in ("C", "POSIX")
        if deterministic is False:
            return Rule(sql=sql, ask=True)
        return Rule(ordered=byte_order, escape="\\", sql=sql)
    if dialect in ("mysql", "mariadb"):
        row = connection.execute(text(
            "SELECT collation_name, character_set_name FROM information_schema.columns "
            "WHERE table_schema = COALESCE(:s, DATABASE()) AND table_name = :t AND column_name = :c"),
            {"s": column.table.schema, "t": column.table.name, "c": column.name}).first()
        if row is None or row[0] is None:  # (a binary string, or a table not there yet)
            return Rule(escape="\\")
        name, charset = row
        sql = ("CONVERT(", f" USING {charset}) COLLATE {name}")
        pad = "nopad" not in name and "0900" not in name
        rest = name[len(charset) + 1:] if name.startswith(charset + "_") else name
        rest = rest.replace("nopad_", "").replace("_nopad", "")
        if rest.endswith("bin"):
            return Rule(pad=pad, escape="\\", sql=sql)
        if rest in _ASCII_FOLDING:
            return Rule(fold=True, pad=pad, ascii_only=True, ordered=False, escape="\\", sql=sql)
        if rest in _ASCII_EXACT:
            return Rule(pad=pad, ascii_only=True, ordered=False, escape="\\", sql=sql)
        return Rule(escape="\\", sql=sql, ask=True)
    return _PLAIN


def compare(op: str, column: Column[Any], mapper: Mapper[Any], a: str, b: str, escape: str | None = None) -> bool:
    """``a <op> b`` (``eq``, ``ne``, ``lt``, ``le``, ``gt``, ``ge``, or ``like``
    with ``b`` the pattern) as the database compares ``column``'s strings,
    for the flush evaluating now; code point order outside a flush."""
    ref = _active.get()
    state = ref() if ref is not None else None
    if state is None:
        return _PLAIN.like(a, b, escape, None) if op == "like" else _PLAIN.compare(op, a, b, None)
    found = state.collations.get(column)
    if found is None:
        connection = state.connection_for_mapper(mapper)
        found = state.collations[column] = (rule_for(column, connection), connection)
    rule, connection = found
    if op == "like":
        return rule.like(a, b, escape, connection)
    return rule.compare(op, a, b, connection)


def dialect_of(mapper: Mapper[Any]) -> Any:
    """The dialect of the database the flush evaluating now writes ``mapper``'s rows to."""
    ref = _active.get()
    state = ref() if ref is not None else None
    if state is None:
        return None
    key = ("dialect", mapper)
    found = state.collations.get(key)
    if found is None:
        found = state.collations[key] = state.connection_for_mapper(mapper).dialect
    return found


def dialect_name(mapper: Mapper[Any]) -> str | None:
    """The name of the database the flush evaluating now writes ``mapper``'s rows to (None outside a flush)."""
    ref = _active.get()
    state = ref() if ref is not None else None
    if state is None:
        return None
    found = state.collations.get(mapper)
    if found is None:
        found = state.collations[mapper] = state.connection_for_mapper(mapper).dialect.name
    return found  # type: ignore[no-any-return]
