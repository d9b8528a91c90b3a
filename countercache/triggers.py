"""Database triggers that keep a counter (private; the DDL of a future ``strategy="trigger"``).

Generated from a resolved :class:`~countercache.declaration.CounterCache`, so
that the database itself keeps ``parent.<counter>`` equal to its recount
(:meth:`countercache.kinds.Kind.real_count`) whatever writes the child rows:
raw SQL, Core statements on a connection, ``INSERT ... SELECT``, and (on
PostgreSQL and SQLite) the deletes of an ``ON DELETE CASCADE``.

* PostgreSQL: three statement-level triggers (``AFTER INSERT / DELETE /
  UPDATE ... REFERENCING ... TABLE ... FOR EACH STATEMENT``) calling one
  plpgsql function. It sums the deltas per parent key over the transition
  tables (new rows add, old rows subtract; zero nets dropped), returns at once
  when none is left (which ends the recursion of a self-referential counter,
  whose own UPDATE fires the table's UPDATE trigger again), locks the parents
  in key order (``FOR NO KEY UPDATE``) and adds in one ``UPDATE``. A fourth
  (``AFTER TRUNCATE``) sets the counters to 0.
* SQLite: row-level ``AFTER INSERT``, ``AFTER DELETE`` and ``AFTER UPDATE OF
  <counted columns> ... WHEN <one changed>`` triggers.
* MariaDB/MySQL: row-level triggers; the UPDATE one only when a counted
  column changed, touching both parents in one ``UPDATE ... ORDER BY <key>``
  (key order). Refused: a self-referential counter (a trigger cannot update
  its own table there), and a child table with a foreign key action that
  changes counted rows (foreign key actions fire no trigger there).

Multi-level counters (``counter_cache("questions.answers")``) get triggers
on the leaf and the middle table too: :mod:`countercache.triggers_through`.

Refused everywhere: a condition reading another table
(a joined subclass), a counter column outside the parent key's table, and an
``ON UPDATE`` action on the counted key that the triggers would count twice
(CASCADE, on PostgreSQL and SQLite: the count already moved with its parent)
or that leaves the parent's count behind (SET NULL / SET DEFAULT).

Not kept, and not detectable here: MariaDB/MySQL's TRUNCATE (fires no
trigger); SQLite's ``REPLACE`` / ``INSERT OR REPLACE`` unless the connection
sets ``PRAGMA recursive_triggers = ON`` (its deletes fire no trigger
otherwise). MariaDB/MySQL refuses (error 1442, nothing changed) a statement
on the child table that reads the parent table (``INSERT ... SELECT ... FROM
parent``, ``DELETE ... WHERE fk IN (SELECT ... FROM parent)``).

Every function returns plain SQL strings, one statement each, as the server
reads them (a ``%`` in a ``where=`` literal is not doubled): run them in order
with :func:`execute`, which sends each without parameters
(``exec_driver_sql(..., execution_options={"no_parameters": True})``; with
parameters, even empty ones, psycopg and PyMySQL would read ``%`` as a
placeholder).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text

from . import triggers_postgresql, triggers_sharded, triggers_through
from ._execute import schema_translation
from .errors import ConfigurationError
from .trigger_sql import (EVENTS, FUNCTION_SUFFIX, MAX_NAME, MIDDLE, MIDDLE_FUNCTION_SUFFIX, PARENT,
                          PARENT_FUNCTION_SUFFIX, TRUNCATE, _names, _own_constraint, _Shape, _targets, _weight, base_name,
                          counted_table, function_name, is_sharded, is_through, parent_statements, row_triggers,
                          table_sql, trigger_name, trigger_names)

__all__ = ["trigger_name", "trigger_names", "function_name", "refusal", "create_statements", "drop_statements",
           "execute", "installed", "installed_bases", "installed_tables", "drop_named_statements", "base_name",
           "MAX_NAME", "EVENTS", "TRUNCATE", "PARENT", "FUNCTION_SUFFIX", "PARENT_FUNCTION_SUFFIX"]

_DATABASES = {"postgresql": "PostgreSQL", "sqlite": "SQLite", "mysql": "MariaDB/MySQL", "mariadb": "MariaDB/MySQL"}


def _database(dialect: Any) -> str:
    return _DATABASES.get(dialect.name, dialect.name)


def refusal(counter: Any, dialect: Any) -> str | None:
    """None when the trigger strategy (``sharded_trigger`` too) can keep ``counter`` on ``dialect``'s database,
    else why not, in one sentence naming the counter and the alternative."""
    name, database, kind = counter.name, _database(dialect), counter.kind
    sharded = kind is not None and is_sharded(counter)
    label, alternative = ("sharded_trigger", "'sharded'") if sharded else ("trigger", "'bulk'")
    if kind is None or counter.column is None:
        return f"{name}: it is not resolved yet (configure the mappers first)"
    if dialect.name not in _DATABASES:
        return f"{name}: the {label} strategy does not support {database} yet; use strategy {alternative}"
    if is_through(counter):
        if sharded:
            return (f"{name}: a multi-level counter ({counter.relationship!r}) is not supported by the "
                    f"{label} strategy yet (on {database}); use strategy 'sharded', or 'trigger'")
        found = _through_refusal(counter, dialect, database)
        if found is not None:
            return found
    shape = _Shape(counter)
    if sharded:
        found = _sharded_refusal(counter, shape, database)
        if found is not None:
            return found
    if any(col.table is not shape.parent for col in shape.parent_key):
        return (f"{name}: its column lives in {shape.parent.name}, not in the table of the parent's key "
                f"(joined-table inheritance), which the {label} strategy does not support yet (on {database}); "
                f"use strategy {alternative}")
    if shape.foreign:
        return (f"{name}: which rows count depends on another table ({shape.foreign[0].table}), which the "
                f"{label} strategy does not support yet (on {database}); use strategy {alternative}")
    own = _own_constraint(shape)
    on_update = (own.onupdate or "").upper() if own is not None else ""
    # (PostgreSQL and SQLite: the action's UPDATE fires the triggers, and a parent
    # whose key changes is recounted under the new one; MariaDB/MySQL: a CASCADE
    # fires no trigger, and the count moves with its parent row)
    if on_update in ("SET NULL", "SET DEFAULT") and dialect.name in ("mysql", "mariadb"):
        return (f"{name}: its foreign key to {shape.parent.name} has ON UPDATE {on_update}, which changes the "
                "counted rows when their parent's key changes without firing a trigger on MariaDB/MySQL; "
                f"declare it without ON UPDATE (or with CASCADE), or use strategy {alternative}")
    if dialect.name in ("mysql", "mariadb"):
        if shape.self_referential and (not sharded or (own is not None and own.ondelete)):
            if sharded:
                return (f"{name}: its foreign key to its own table ({shape.child.name}) has ON DELETE "
                        f"{own.ondelete.upper()}, whose deletes fire no trigger on MariaDB/MySQL, which the "
                        f"{label} strategy needs there; declare it without ON DELETE, or use strategy {alternative}")
            return (f"{name}: MariaDB/MySQL triggers cannot update the table that fired them "
                    f"({shape.child.name}: a self-referential counter); use strategy {alternative}, or "
                    "'sharded_trigger' (its triggers write the side table)")
        action = _silent_action(shape)
        if action is not None:
            return (f"{name}: {shape.child.name}'s foreign key to {action} changes counted rows by a "
                    f"foreign key action, which fires no trigger on MariaDB/MySQL; use strategy {alternative}")
    return None


def _sharded_refusal(counter: Any, shape: _Shape, database: str) -> str | None:
    """Why ``sharded_trigger`` cannot keep ``counter`` (the side table's needs, as ``sharded``'s), else None."""
    from .sidetable import check_shardable

    try:
        check_shardable(counter, counter.name, need_table=True, strategy="sharded_trigger")
    except ConfigurationError as error:
        return f"{error} (checked on {database})"
    own = _own_constraint(shape)
    on_update = (own.onupdate or "").upper() if own is not None else ""
    if on_update and on_update != "NO ACTION" and on_update != "RESTRICT":
        # (the rows it moves to the parent's new key are added there, while the
        # parent's pending shard rows stay under the old key)
        return (f"{counter.name}: its foreign key to {shape.parent.name} has ON UPDATE {on_update}, and "
                f"sharded_trigger keeps no parent key change (on {database}); declare it without ON UPDATE, "
                "or use strategy 'trigger'")
    return None


def _through_refusal(counter: Any, dialect: Any, database: str) -> str | None:
    """Why the trigger strategy cannot keep the multi-level ``counter``, else None."""
    name = counter.name
    shape = _Shape(counter)
    leaf = shape.through
    assert leaf is not None
    parent, middle = shape.parent.name, shape.child.name
    if len({id(shape.parent), id(shape.child), id(leaf.child)}) < 3:
        return (f"{name}: a multi-level counter over its own tables ({parent}, {middle}, {leaf.child.name}: not "
                f"three different ones) is not supported by the trigger strategy (on {database}); use strategy 'bulk'")
    other = next((c for c in leaf.foreign if c.table is shape.child or c.table is shape.parent), None)
    if other is not None:  # (where= over the middle row: the ORM strategies cannot evaluate it either)
        return (f"{name}: its where=/sum= reads {other.table.name}.{other.name}, a column of another table than "
                f"the counted {leaf.child.name} rows, which no strategy keeps yet (on {database}); write it over "
                f"{leaf.child.name}'s own columns")
    if shape.condition is not None or leaf.foreign:
        which = middle if shape.condition is not None else leaf.foreign[0].table
        return (f"{name}: which rows count depends on {which} (an inheriting class), which the trigger strategy "
                f"does not support yet for a multi-level counter (on {database}); use strategy 'bulk'")
    own = _own_constraint(_Link(leaf))
    action = (own.onupdate or "").upper() if own is not None else ""
    if action and action not in ("NO ACTION", "RESTRICT"):
        # (the moved leaves would be added under their middle row's new key, which carries them too)
        return (f"{name}: {leaf.child.name}'s foreign key to {middle} has ON UPDATE {action}, which the trigger "
                f"strategy would count twice when a {middle} key changes (on {database}); declare it without "
                "ON UPDATE, or use strategy 'bulk'")
    if dialect.name in ("mysql", "mariadb"):
        for table, link in ((leaf.child.name, _Link(leaf)), (middle, shape)):
            silent = _silent_action(link)
            if silent is not None:
                return (f"{name}: {table}'s foreign key to {silent} changes counted rows by a foreign key "
                        "action, which fires no trigger on MariaDB/MySQL; use strategy 'bulk'")
    return None


class _Link:
    """A multi-level counter's leaves as :func:`_own_constraint` / :func:`_silent_action` read a shape."""

    def __init__(self, leaf: Any) -> None:
        self.child, self.fk, self.parent, self.columns = leaf.child, leaf.fk, leaf.middle, leaf.columns


def _silent_action(shape: _Shape) -> str | None:
    """A foreign key of the child table whose action deletes or changes counted rows
    (other than the counted key's own ON DELETE/ON UPDATE, which go with the parent)."""
    counted = {c.name for c in shape.columns}
    for fk in shape.child.foreign_key_constraints:
        own = fk is _own_constraint(shape)
        deletes = (fk.ondelete or "").upper() == "CASCADE"
        writes = {(fk.ondelete or "").upper(), (fk.onupdate or "").upper()} & {"CASCADE", "SET NULL", "SET DEFAULT"}
        if not own and (deletes or (writes and counted & {c.name for c in fk.columns})):
            return fk.referred_table.name
    return None


def _check(counter: Any, dialect: Any) -> None:
    found = refusal(counter, dialect)
    if found is not None:
        raise ConfigurationError(found)


# -- rendering ----------------------------------------------------------------

def create_statements(counter: Any, dialect: Any) -> list[str]:
    """The statements creating the counter's triggers (and PostgreSQL's function), in order.

    Raises :class:`~countercache.errors.ConfigurationError` (:func:`refusal`'s
    message) where the database cannot keep it."""
    _check(counter, dialect)
    if is_sharded(counter):
        return triggers_sharded.create_statements(counter, dialect)
    if dialect.name == "postgresql":
        return triggers_postgresql.create_statements(counter, dialect)
    shape, parent, child, column = _names(counter, dialect)
    quote = dialect.identifier_preparer.quote
    names = {event: quote(name) for event, name in trigger_names(counter, dialect).items()}
    # (a multi-level counter: the rows counted are its leaves, their parent the one of their middle row)
    rows, counted = (shape, child) if shape.through is None else (shape.through, table_sql(shape.through.child, dialect))

    def targets(row: str) -> str:
        if shape.through is None:
            return _targets(shape, row, dialect)
        return triggers_through.leaf_targets(shape, row, dialect)

    add = f"UPDATE {parent} SET {column} = {column} + {_weight(rows, 'NEW', dialect)} WHERE {targets('NEW')}"
    subtract = f"UPDATE {parent} SET {column} = {column} - {_weight(rows, 'OLD', dialect)} WHERE {targets('OLD')}"
    both = (f"UPDATE {parent} SET {column} = {column}"
            f" + CASE WHEN {targets('NEW')} THEN {_weight(rows, 'NEW', dialect)} ELSE 0 END"
            f" - CASE WHEN {targets('OLD')} THEN {_weight(rows, 'OLD', dialect)} ELSE 0 END"
            f" WHERE {targets('NEW')} OR {targets('OLD')}")
    parents = parent_statements(shape, names, parent, child, column, dialect)
    if shape.through is not None:
        parents = [*triggers_through.middle_statements(counter, dialect, names), *parents]
    # (MariaDB/MySQL: the UPDATE touches the two parents in key order)
    return [*row_triggers((names["INSERT"], names["DELETE"], names["UPDATE"]), counted, add, subtract, both,
                          rows.columns, shape.parent_key, dialect), *parents]


def drop_statements(counter: Any, dialect: Any) -> list[str]:
    """The statements dropping the counter's triggers (and functions) if they exist."""
    child = counted_table(counter)
    return drop_named_statements(trigger_name(counter), child.name, child.schema, dialect,
                                 parent=counter.column.table.name)


def drop_named_statements(base: str, child: str, schema: str | None, dialect: Any,
                          parent: str | None = None) -> list[str]:
    """The statements dropping the triggers (and functions) called ``base`` + suffix,
    on table ``child`` (and ``parent``), if they exist (what a migration drops by name)."""
    prep = dialect.identifier_preparer
    events = {**EVENTS, **TRUNCATE} if dialect.name == "postgresql" else dict(EVENTS)
    names = [base + suffix for suffix in events.values()]
    # (and a multi-level counter's on its middle table; on PostgreSQL, its function's CASCADE drops them)
    parent_names = [base + suffix for suffix in (*PARENT.values(), *triggers_sharded.PARENT_TRIGGERS.values())]
    middle_names = [base + suffix for suffix in MIDDLE.values()]
    prefix = f"{prep.quote_schema(schema)}." if schema and dialect.name != "sqlite" else ""
    if dialect.name == "postgresql":
        on_parent = [] if parent is None else [
            f"DROP TRIGGER IF EXISTS {prep.quote(n)} ON {prefix}{prep.quote(parent)}" for n in parent_names]
        # (the functions' CASCADE drops the triggers of a table not named here)
        return [*(f"DROP TRIGGER IF EXISTS {prep.quote(n)} ON {prefix}{prep.quote(child)}" for n in names),
                *on_parent,
                f"DROP FUNCTION IF EXISTS {prefix}{prep.quote(base + FUNCTION_SUFFIX)}() CASCADE",
                f"DROP FUNCTION IF EXISTS {prefix}{prep.quote(base + PARENT_FUNCTION_SUFFIX)}() CASCADE",
                f"DROP FUNCTION IF EXISTS {prefix}{prep.quote(base + MIDDLE_FUNCTION_SUFFIX)}() CASCADE"]
    return [f"DROP TRIGGER IF EXISTS {prefix}{prep.quote(n)}"
            for n in (*names, *parent_names, *middle_names)]


def execute(connection: Any, statements: list[str]) -> None:
    """Run ``statements`` (:func:`create_statements`, :func:`drop_statements`) in order on ``connection``."""
    for statement in statements:
        connection.exec_driver_sql(statement, execution_options={"no_parameters": True})


def _names_of(counter: Any, dialect: Any) -> dict[str, str]:
    """The counter's trigger names under its strategy."""
    if is_sharded(counter):
        return triggers_sharded.trigger_names(counter, dialect)
    return trigger_names(counter, dialect)


def translated(connection: Any, counter: Any) -> str | None:
    """None unless ``connection`` has a ``schema_translate_map`` that moves one of the
    counter's tables to another schema: the trigger DDL names its tables as
    declared, so it would be made for (and would write) the untranslated tables."""
    translate = schema_translation(connection)
    if not translate or counter.column is None or counter.kind is None:
        return None
    tables = [counter.column.table, counted_table(counter), counter.kind.key_columns()[0].table]
    if is_sharded(counter):
        tables.append(None)  # (countercache_shards, in the default schema)
    moved = sorted({t.name if t is not None else "countercache_shards" for t in tables
                    if translate.get(None if t is None else t.schema, None if t is None else t.schema)
                    != (None if t is None else t.schema)})
    if not moved:
        return None
    return (f"{counter.name}: the connection's schema_translate_map moves {', '.join(moved)} to another schema, "
            f"which the {counter.strategy()} strategy does not support yet (its triggers name the tables as "
            f"declared); use strategy {'sharded' if is_sharded(counter) else 'bulk'!r}, or declare the schema "
            "on the tables")


def installed(connection: Any, counter: Any) -> bool:
    """Do all of the counter's triggers exist in ``connection``'s database? (one catalog query)"""
    dialect = connection.dialect
    names = list(_names_of(counter, dialect).values())
    table = counted_table(counter)
    params: dict[str, Any] = {f"n{i}": n for i, n in enumerate(names)}
    listed = ", ".join(f":n{i}" for i in range(len(names)))
    if dialect.name == "postgresql":
        params["t"] = dialect.identifier_preparer.format_table(table)
        params["p"] = dialect.identifier_preparer.format_table(counter.column.table)
        params["m"] = dialect.identifier_preparer.format_table(counter.kind.key_columns()[0].table)
        query = ("SELECT count(*) FROM pg_trigger WHERE tgrelid IN (to_regclass(:t), to_regclass(:p), "
                 f"to_regclass(:m)) AND tgname IN ({listed})")
    elif dialect.name == "sqlite":
        query = f"SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ({listed})"
    else:
        params["s"] = table.schema
        query = ("SELECT count(*) FROM information_schema.triggers WHERE trigger_schema = "
                 f"coalesce(:s, DATABASE()) AND trigger_name IN ({listed})")
    return connection.execute(text(query), params).scalar_one() == len(names)



_CHILD_SUFFIXES = {*EVENTS.values(), *TRUNCATE.values()}
#: every suffix of a counter's trigger names (counted, parent and middle table's; ``sharded_trigger``'s)
_SUFFIXES = sorted({*_CHILD_SUFFIXES, *PARENT.values(), *triggers_sharded.PARENT_TRIGGERS.values(), *MIDDLE.values()})
_BASE = re.compile(r"^(cc_[a-z0-9_]*_[0-9a-f]{8})(" + "|".join(_SUFFIXES) + ")$")


def installed_bases(connection: Any, schema: str | None = None) -> dict[str, str]:
    """``{base name: counted table}``: the countercache triggers (``cc_`` names) on a counted
    table found in the catalog of ``connection``'s database (``schema``: None for the default one)."""
    found = {base: next(table for suffix, table in tables.items() if suffix in _CHILD_SUFFIXES)
             for (_, base), tables in installed_tables(connection, (schema,)).items()
             if _CHILD_SUFFIXES & tables.keys()}
    return dict(sorted(found.items()))


def installed_tables(connection: Any, schemas: Iterable[str | None] = (None,)
                     ) -> dict[tuple[str | None, str], dict[str, str]]:
    """``{(schema, base name): {suffix: table}}``: every countercache trigger (``cc_`` names: on
    the counted, parent or middle table) found in the catalog of ``connection``'s database, in each
    of ``schemas`` (None: the default one; SQLite: its main database, whatever the schema)."""
    dialect = connection.dialect
    if dialect.name == "postgresql":
        query = ("SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                 "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT t.tgisinternal "
                 "AND n.nspname = coalesce(:s, current_schema()) AND t.tgname LIKE :p ESCAPE '!'")
    elif dialect.name == "sqlite":
        query = "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' AND name LIKE :p ESCAPE '!'"
        schemas = (None,)
    else:
        query = ("SELECT trigger_name, event_object_table FROM information_schema.triggers WHERE trigger_schema = "
                 "coalesce(:s, DATABASE()) AND trigger_name LIKE :p ESCAPE '!'")
    found: dict[tuple[str | None, str], dict[str, str]] = {}
    for schema in dict.fromkeys(schemas):
        params: dict[str, Any] = {"p": "cc!_%"} if dialect.name == "sqlite" else {"p": "cc!_%", "s": schema}
        for name, table in connection.execute(text(query), params):
            matched = _BASE.match(name)
            if matched:
                found.setdefault((schema, matched.group(1)), {})[matched.group(2)] = table
    return found
