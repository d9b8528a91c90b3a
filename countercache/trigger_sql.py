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
#: A multi-level counter's triggers on its middle table (``questions`` of
#: ``counter_cache("questions.answers")``): a middle row carries its leaves.
MIDDLE = {"MIDDLE_INSERT": "_min", "MIDDLE_DELETE": "_mdl", "MIDDLE_UPDATE": "_mup", "MIDDLE_TRUNCATE": "_mtr"}
FUNCTION_SUFFIX = "_fn"
#: PostgreSQL: the function of the parent-table triggers.
PARENT_FUNCTION_SUFFIX = "_pfn"
#: PostgreSQL: the function of a multi-level counter's middle-table triggers.
MIDDLE_FUNCTION_SUFFIX = "_mfn"


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
    if is_through(counter):  # (a multi-level counter: the leaves it counts through the middle rows)
        variant = through_variant(*through_names(counter))
    return base_name(table.schema, table.name, counter.column.name, getattr(child, "name", ""), fks, keys,
                     counter.where_sql, counter.sum_sql, variant)


def is_through(counter: Any) -> bool:
    """Is ``counter`` multi-level (it counts the leaves of its middle rows)?"""
    return hasattr(getattr(counter, "kind", None), "leaf")


def through_names(counter: Any) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(leaf table, its foreign key columns, the middle table's key columns they refer to):
    what names a multi-level counter's triggers besides its middle table and parent."""
    kind = counter.kind
    return (kind.leaf.key_columns()[0].table.name, tuple(c.name for c in kind.leaf.key_columns()),
            tuple(c.name for c in kind.middle_key()))


def through_variant(leaf: str, leaf_fks: Any, middle_key: Any) -> str:
    return f"through:{leaf}:{','.join(leaf_fks)}:{','.join(middle_key)}"


def counted_table(counter: Any) -> Any:
    """The table whose rows feed the counter (a multi-level counter's leaf table)."""
    kind = counter.kind
    return (kind.leaf if is_through(counter) else kind).key_columns()[0].table


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
    suffixes = (*EVENTS.values(), *TRUNCATE.values(), *PARENT.values(), *MIDDLE.values(), FUNCTION_SUFFIX,
                PARENT_FUNCTION_SUFFIX, MIDDLE_FUNCTION_SUFFIX)
    room = MAX_NAME - max(len(s) for s in suffixes) - len("cc__") - len(digest)
    return f"cc_{body[:room].rstrip('_')}_{digest}"


def trigger_names(counter: Any, dialect: Any = None) -> dict[str, str]:
    """``{"INSERT": name, "DELETE": name, "UPDATE": name}`` on the counted table
    (and ``"TRUNCATE"`` on PostgreSQL), then ``"PARENT_INSERT"`` and (unless a
    MariaDB/MySQL ``ON UPDATE CASCADE`` moves the count with its row)
    ``"PARENT_UPDATE"`` on the parent table. A multi-level counter's are on
    its leaf table, then ``"MIDDLE_*"`` on its middle table."""
    base = trigger_name(counter)
    events = dict(EVENTS)
    if dialect is not None and dialect.name == "postgresql":
        events.update(TRUNCATE)
    if is_through(counter):
        events.update({k: v for k, v in MIDDLE.items()
                       if k != "MIDDLE_TRUNCATE" or (dialect is not None and dialect.name == "postgresql")})
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
        #: A multi-level counter: its leaves (this shape's child is then the middle table,
        #: its condition which middle rows count, and the leaves are what they weigh).
        self.through: _Leaf | None = None
        if is_through(counter):
            self.through = _Leaf(kind.leaf, kind.middle_key())
            self.condition, self.value = kind.middle_condition(), None
        self.self_referential = self.child is self.parent
        self.foreign, self.columns = _columns(self.child, (*self.fk, self.condition, self.value))


class _Leaf:
    """A multi-level counter's leaf rows, as :class:`_Shape` describes a child table's."""

    def __init__(self, leaf: Any, middle_key: list[Any]) -> None:
        self.fk = leaf.key_columns()
        self.child = self.fk[0].table
        self.key = middle_key  # (what the foreign key refers to, in its order)
        self.middle = middle_key[0].table
        self.condition = leaf.condition()
        self.value = None if _is_one(leaf.row_value()) else leaf.row_value()
        self.foreign, self.columns = _columns(self.child, (*self.fk, self.condition, self.value))


def _columns(table: Any, expressions: Any) -> tuple[list[Any], list[Any]]:
    """(the columns of other tables that ``expressions`` read (a joined subclass's condition),
    the columns of ``table`` they read, foreign key first: whose values decide the counter)."""
    seen: list[Any] = []
    foreign: list[Any] = []
    for expr in expressions:
        for elem in ([] if expr is None else iterate(expr)):
            if isinstance(elem, ColumnClause) and getattr(elem, "table", None) is not None:
                if elem.table is not table:
                    foreign.append(elem)
                elif all(c.name != elem.name for c in seen):
                    seen.append(table.c[elem.name])
    return foreign, seen


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

def table_sql(table: Any, dialect: Any) -> str:
    """``table`` as the dialect's trigger bodies name it (SQLite's: unqualified)."""
    prep = dialect.identifier_preparer
    return prep.quote(table.name) if dialect.name == "sqlite" else prep.format_table(table)


def _recount(shape: _Shape, row: str, dialect: Any, child: str) -> str:
    """SQL: the real count (or sum) of the parent ``row`` refers to, read from ``child``
    (a multi-level counter's: its leaves joined to the middle rows of ``child``)."""
    quote = dialect.identifier_preparer.quote
    leaf = shape.through
    if leaf is not None:
        joined = " AND ".join(f"cc_l.{quote(fk.name)} = cc_c.{quote(key.name)}" for fk, key in zip(leaf.fk, leaf.key))
        keys = " AND ".join(f"cc_c.{quote(fk.name)} = {row}.{quote(pk.name)}"
                            for pk, fk in zip(shape.parent_key, shape.fk))
        conditions = "".join(f" AND {_counts(part, alias, dialect)}" for part, alias in ((shape, "cc_c"), (leaf, "cc_l"))
                             if part.condition is not None)
        total = "count(*)" if leaf.value is None else f"coalesce(sum({_weight(leaf, 'cc_l', dialect)}), 0)"
        return (f"(SELECT {total} FROM {table_sql(leaf.child, dialect)} AS cc_l JOIN {child} AS cc_c ON {joined} "
                f"WHERE {keys}{conditions})")
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


def parent_statements(shape: _Shape, names: dict[str, str], parent: str, child: str, column: str,
                      dialect: Any) -> list[str]:
    """SQLite and MariaDB/MySQL: the parent table's triggers (``names`` quoted). A new
    parent row, or one whose key changed, holds the count of the rows under its key now."""
    quote = dialect.identifier_preparer.quote
    recount = _recount(shape, "NEW", dialect, child)
    if dialect.name == "sqlite":
        own_row = " AND ".join(f"{quote(pk.name)} = NEW.{quote(pk.name)}" for pk in shape.parent_key)
        keys = ", ".join(quote(pk.name) for pk in shape.parent_key)
        return [
            f"CREATE TRIGGER {names['PARENT_INSERT']} AFTER INSERT ON {parent} FOR EACH ROW "
            f"BEGIN UPDATE {parent} SET {column} = {recount} WHERE {own_row}; END",
            f"CREATE TRIGGER {names['PARENT_UPDATE']} AFTER UPDATE OF {keys} ON {parent} FOR EACH ROW "
            f"WHEN {_key_changed(shape, 'IS', dialect)} BEGIN UPDATE {parent} SET {column} = {recount} "
            f"WHERE {own_row}; END",
        ]
    statements = [f"CREATE TRIGGER {names['PARENT_INSERT']} BEFORE INSERT ON {parent} FOR EACH ROW "
                  f"SET NEW.{column} = {recount}"]
    if "PARENT_UPDATE" in names:  # (not with ON UPDATE CASCADE: the count moves with the row, no trigger fires)
        statements.append(f"CREATE TRIGGER {names['PARENT_UPDATE']} BEFORE UPDATE ON {parent} FOR EACH ROW "
                          f"BEGIN IF {_key_changed(shape, '<=>', dialect)} THEN SET NEW.{column} = {recount}; "
                          "END IF; END")
    return statements


def row_triggers(names: tuple[str, str, str], table: str, add: str, subtract: str, both: str, columns: list[Any],
                 order: list[Any], dialect: Any, delete: str = "AFTER") -> list[str]:
    """SQLite and MariaDB/MySQL: the three row triggers of ``table`` (``names``: quoted,
    INSERT, DELETE, UPDATE): ``add`` after an INSERT, ``subtract`` ``delete`` (AFTER, or
    BEFORE) a DELETE, ``both`` after an UPDATE that changed one of ``columns`` (on
    MariaDB/MySQL touching the parents in the key order of ``order``)."""
    quote = dialect.identifier_preparer.quote
    same = "<=>" if dialect.name != "sqlite" else "IS"
    changed = "NOT (" + " AND ".join(f"NEW.{quote(c.name)} {same} OLD.{quote(c.name)}" for c in columns) + ")"
    inserted, deleted, updated = names
    if dialect.name == "sqlite":
        return [
            f"CREATE TRIGGER {inserted} AFTER INSERT ON {table} FOR EACH ROW BEGIN {add}; END",
            f"CREATE TRIGGER {deleted} {delete} DELETE ON {table} FOR EACH ROW BEGIN {subtract}; END",
            f"CREATE TRIGGER {updated} AFTER UPDATE OF {', '.join(quote(c.name) for c in columns)} ON {table} "
            f"FOR EACH ROW WHEN {changed} BEGIN {both}; END",
        ]
    return [
        f"CREATE TRIGGER {inserted} AFTER INSERT ON {table} FOR EACH ROW {add}",
        f"CREATE TRIGGER {deleted} {delete} DELETE ON {table} FOR EACH ROW {subtract}",
        f"CREATE TRIGGER {updated} AFTER UPDATE ON {table} FOR EACH ROW BEGIN IF {changed} THEN {both} "
        f"ORDER BY {', '.join(quote(c.name) for c in order)}; END IF; END",
    ]
