"""Names and SQL pieces shared by the trigger generators (private; see :mod:`countercache.triggers`).

What a counter's triggers are called, what they need of the counter (its
child table, keys, condition and row value: :class:`_Shape`), and its
``where=`` / ``sum=`` rendered over a trigger's row reference.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from sqlalchemy import literal_column
from sqlalchemy.sql.elements import BindParameter, ColumnClause
from sqlalchemy.sql.visitors import iterate, replacement_traverse

from .config import _config

MAX_NAME = 63
#: Per-event suffixes of the trigger names, and the PostgreSQL function's.
EVENTS = {"INSERT": "_ins", "DELETE": "_del", "UPDATE": "_upd"}
#: PostgreSQL's fourth trigger: a TRUNCATE of the child table zeroes the counters.
TRUNCATE = {"TRUNCATE": "_trn"}
#: Triggers on the parent table: a new row, or a row whose key changes, gets
#: its real count (children inserted before it, or moved to its new key after).
PARENT = {"PARENT_INSERT": "_pin", "PARENT_UPDATE": "_pup"}
FUNCTION_SUFFIX = "_fn"
#: PostgreSQL: the function of the parent-table triggers.
PARENT_FUNCTION_SUFFIX = "_pfn"


def trigger_name(counter: Any) -> str:
    """:func:`_trigger_name`, remembered per configuration (it asks for the strategy)."""
    cached = counter.__dict__.get("_trigger_name")
    if cached is not None and cached[0] == _config.generation and cached[2] is counter.kind:
        return cached[1]  # type: ignore[no-any-return]
    found = _trigger_name(counter)
    if counter.kind is not None:
        counter.__dict__["_trigger_name"] = (_config.generation, found, counter.kind)
    return found


def _trigger_name(counter: Any) -> str:
    """``cc_<parent table>_<counter column>_<hash>``: the base name of the counter's
    triggers (lower case, ``[a-z0-9_]``, at most 55 characters so that every
    per-event suffix stays within 63). The hash covers schema, table and column
    (two counters whose names read alike once shortened stay apart) and the
    definition the triggers implement (counted table, keys, ``where_sql`` and
    ``sum_sql``): triggers of a previous definition go by another name."""
    table = counter.column.table
    try:
        fk = list(counter.kind.key_columns())
        child, fks = fk[0].table, [c.name for c in fk]
        keys = [c.name for c in counter.mapper.primary_key]
    except (AttributeError, IndexError, TypeError):  # not resolved (or not a one-table count)
        child, fks, keys = None, [], []
    # (sharded_trigger: other triggers, whose SQL holds the shard count)
    variant = f"sharded_trigger:{counter.shards()}" if is_sharded(counter) else None
    return base_name(table.schema, table.name, counter.column.name, getattr(child, "name", ""), fks, keys,
                     counter.where_sql, counter.sum_sql, variant)


def is_sharded(counter: Any) -> bool:
    """Is ``counter`` kept by ``sharded_trigger``'s triggers? (a migration's plain
    definition, without a strategy, is ``trigger``'s)"""
    strategy = getattr(counter, "strategy", None)
    return strategy is not None and strategy() == "sharded_trigger"


def base_name(schema: str | None, table: str, column: str, child: str, fks: Any, keys: Any,
              where: str | None, sum: str | None, variant: str | None = None) -> str:
    """:func:`trigger_name` from plain values (what a migration records)."""
    definition = "|".join([f"{schema or ''}.{table}.{column}", child, ",".join(fks), ",".join(keys),
                           *(" ".join((sql or "").split()) for sql in (where, sum))]
                          + ([] if variant is None else [variant]))
    digest = hashlib.sha1(definition.encode("utf-8")).hexdigest()[:8]
    body = re.sub(r"[^a-z0-9_]+", "_", f"{table}_{column}".lower()).strip("_")
    suffixes = (*EVENTS.values(), *TRUNCATE.values(), *PARENT.values(), FUNCTION_SUFFIX, PARENT_FUNCTION_SUFFIX)
    room = MAX_NAME - max(len(s) for s in suffixes) - len("cc__") - len(digest)
    return f"cc_{body[:room].rstrip('_')}_{digest}"


def trigger_names(counter: Any, dialect: Any = None) -> dict[str, str]:
    """``{"INSERT": name, "DELETE": name, "UPDATE": name}`` on the counted table
    (and ``"TRUNCATE"`` on PostgreSQL), then ``"PARENT_INSERT"`` and (unless a
    MariaDB/MySQL ``ON UPDATE CASCADE`` moves the count with its row)
    ``"PARENT_UPDATE"`` on the parent table."""
    base = trigger_name(counter)
    events = dict(EVENTS)
    if dialect is not None and dialect.name == "postgresql":
        events.update(TRUNCATE)
    events["PARENT_INSERT"] = PARENT["PARENT_INSERT"]
    if not (dialect is not None and dialect.name in ("mysql", "mariadb") and _moves_with_parent(_Shape(counter))):
        events["PARENT_UPDATE"] = PARENT["PARENT_UPDATE"]
    return {event: base + suffix for event, suffix in events.items()}


def _own_constraint(shape: Any) -> Any:
    """The child table's foreign key constraint on the counted key (None: not declared)."""
    for fk in shape.child.foreign_key_constraints:
        if {c.name for c in fk.columns} == {c.name for c in shape.fk} and fk.referred_table is shape.parent:
            return fk
    return None


def _moves_with_parent(shape: Any) -> bool:
    """Does the counted key's foreign key have ON UPDATE CASCADE (the rows follow a new parent key)?"""
    own = _own_constraint(shape)
    return own is not None and (own.onupdate or "").upper() == "CASCADE"

class _Shape:
    """What a trigger needs of a counter: the child table, its key columns and
    the parent's (in key order), the condition and the value of a row."""

    def __init__(self, counter: Any) -> None:
        kind = counter.kind
        self.counter, self.kind = counter, kind
        self.parent = counter.column.table
        self.parent_key = list(counter.mapper.primary_key)
        self.fk = kind.key_columns()
        self.child = self.fk[0].table
        self.condition = kind.condition()
        self.value = None if _is_one(kind.row_value()) else kind.row_value()  # None: a count
        self.self_referential = self.child is self.parent
        seen: list[Any] = []
        self.foreign: list[Any] = []  # columns of other tables (a joined subclass's condition)
        for expr in (*self.fk, self.condition, self.value):
            for elem in ([] if expr is None else iterate(expr)):
                if isinstance(elem, ColumnClause) and getattr(elem, "table", None) is not None:
                    if elem.table is not self.child:
                        self.foreign.append(elem)
                    elif all(c.name != elem.name for c in seen):
                        seen.append(self.child.c[elem.name])
        #: The child columns whose values decide the counter (foreign key first).
        self.columns = seen


def _is_one(expr: Any) -> bool:
    return isinstance(expr, BindParameter) and expr.value == 1

def _sql(expr: Any, shape: _Shape, row: str, dialect: Any) -> str:
    """``expr`` with the child table's columns read from ``row`` (``NEW``, ``OLD``,
    an alias), rendered for ``dialect`` with its values inline."""
    quote = dialect.identifier_preparer.quote

    def swap(elem: Any) -> Any:
        if isinstance(elem, ColumnClause) and getattr(elem, "table", None) is shape.child:
            return literal_column(f"{row}.{quote(elem.name)}", type_=elem.type)
        return None

    compiled = str(replacement_traverse(expr, {}, swap).compile(
        dialect=dialect, compile_kwargs={"literal_binds": True}))
    if dialect.paramstyle in ("format", "pyformat"):  # executed without parameters: % is itself
        compiled = compiled.replace("%%", "%")
    return compiled


def _counts(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL: does ``row`` count (its condition; TRUE when every row counts)?"""
    return "1 = 1" if shape.condition is None else f"({_sql(shape.condition, shape, row, dialect)})"


def _weight(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL: what ``row`` adds when it counts (NULL adds 0)."""
    return "1" if shape.value is None else f"coalesce({_sql(shape.value, shape, row, dialect)}, 0)"


def _names(counter: Any, dialect: Any) -> tuple[_Shape, str, str, str]:
    """(shape, parent table, child table, counter column) as the dialect writes them."""
    prep = dialect.identifier_preparer
    shape = _Shape(counter)
    if dialect.name == "sqlite":  # trigger bodies take unqualified table names
        return shape, prep.quote(shape.parent.name), prep.quote(shape.child.name), prep.quote(counter.column.name)
    return shape, prep.format_table(shape.parent), prep.format_table(shape.child), prep.quote(counter.column.name)


def _targets(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL: the parent row (unqualified columns) is the one ``row`` refers to, and ``row`` counts."""
    quote = dialect.identifier_preparer.quote
    keys = " AND ".join(f"{quote(pk.name)} = {row}.{quote(fk.name)}" for pk, fk in zip(shape.parent_key, shape.fk))
    return f"({keys} AND {_counts(shape, row, dialect)})"

def _recount(shape: _Shape, row: str, dialect: Any, child: str) -> str:
    """SQL: the real count (or sum) of the parent ``row`` refers to, read from ``child``."""
    quote = dialect.identifier_preparer.quote
    keys = " AND ".join(f"cc_c.{quote(fk.name)} = {row}.{quote(pk.name)}"
                        for pk, fk in zip(shape.parent_key, shape.fk))
    condition = "" if shape.condition is None else f" AND {_counts(shape, 'cc_c', dialect)}"
    total = "count(*)" if shape.value is None else f"coalesce(sum({_weight(shape, 'cc_c', dialect)}), 0)"
    return f"(SELECT {total} FROM {child} AS cc_c WHERE {keys}{condition})"


def _key_changed(shape: _Shape, same: str, dialect: Any) -> str:
    """SQL: the parent row's key changed (``same``: the null-safe equality, ``IS`` or ``<=>``)."""
    quote = dialect.identifier_preparer.quote
    return "NOT (" + " AND ".join(f"NEW.{quote(pk.name)} {same} OLD.{quote(pk.name)}" for pk in shape.parent_key) + ")"


def function_name(counter: Any, dialect: Any, suffix: str = FUNCTION_SUFFIX) -> str:
    """PostgreSQL: the trigger function's name, quoted (in the child table's schema;
    ``suffix=PARENT_FUNCTION_SUFFIX``: the parent-table triggers' function)."""
    prep = dialect.identifier_preparer
    schema = counter.kind.key_columns()[0].table.schema
    return (f"{prep.quote_schema(schema)}." if schema else "") + prep.quote(trigger_name(counter) + suffix)



def _bare_type(type_: Any, dialect: Any) -> str:
    """The type as a plpgsql array variable's element (no COLLATE clause)."""
    if getattr(type_, "collation", None):
        type_ = type_.copy()
        type_.collation = None
    return str(type_.compile(dialect=dialect))


#: The transition tables each statement-level trigger names.
_REFERENCING = {"INSERT": "NEW TABLE AS cc_new", "DELETE": "OLD TABLE AS cc_old",
                "UPDATE": "OLD TABLE AS cc_old NEW TABLE AS cc_new"}


def _statement_triggers(names: dict[str, str], child: str, fn: str, quote: Any) -> list[str]:
    """The counted table's four statement-level triggers, calling ``fn``."""
    return [*(f"CREATE TRIGGER {quote(names[event])} AFTER {event} ON {child} REFERENCING "
              f"{_REFERENCING[event]} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()" for event in EVENTS),
            f"CREATE TRIGGER {quote(names['TRUNCATE'])} AFTER TRUNCATE ON {child} FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {fn}()"]
