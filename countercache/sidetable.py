"""The ``sharded`` strategy's side table: its schema and the checks a counter must pass.

``countercache_shards`` holds, per ``(counter, parent key, shard)``, a delta
not yet folded into the parent column (see :mod:`countercache.shards` for
why, and for :func:`~countercache.fold` and :func:`~countercache.exact`).
This module only describes the table: writing its rows is
:mod:`countercache.shard_writes`, reading and folding them
:mod:`countercache.shards`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Column, Enum, Integer, MetaData, SmallInteger, String, Table, Uuid, cast, func, inspect, \
    select
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import configure_mappers
from sqlalchemy.sql.expression import ColumnElement

from ._compat import InternalTraversal
from ._execute import schema_translation, translated
from .errors import ConfigurationError, CounterCacheError

if TYPE_CHECKING:
    from .declaration import CounterCache

__all__ = ["TABLE_NAME", "DEFAULT_SHARDS", "shard_table"]

TABLE_NAME = "countercache_shards"
DEFAULT_SHARDS = 16
MAX_SHARDS = 1024

#: Characters of a parent's key in the side table.
KEY_LENGTH = 100

#: The strategies that keep pending deltas in the side table.
SHARD_STRATEGIES = ("sharded", "sharded_trigger")

#: engine -> the side tables (schema, name) found in its database: asked once each
_present: weakref.WeakKeyDictionary[Any, set[tuple[str | None, str]]] = weakref.WeakKeyDictionary()

def shard_table(metadata: MetaData) -> Table:
    """The side table of ``sharded`` counters in ``metadata`` (added when missing).

    Declaring a counter with ``strategy="sharded"`` calls this for the
    counter's own metadata; call it yourself (``shard_table(Base.metadata)``)
    before switching counters to ``sharded`` through configuration, and let
    the migration create it.
    """
    existing = metadata.tables.get(TABLE_NAME)
    if existing is not None:
        return existing
    return Table(
        TABLE_NAME,
        metadata,
        Column("counter", String(150), primary_key=True),
        Column("parent_key", _KEY_TYPE, primary_key=True),
        Column("shard", SmallInteger, primary_key=True, autoincrement=False),
        Column("delta", BigInteger, nullable=False),
        comment="countercache: pending deltas of sharded counters (countercache.fold moves them to the parents)",
        listeners=[("after_drop", _dropped)],
    )


def _dropped(table: Table, connection: Any, **kw: Any) -> None:
    """The side table dropped through the metadata: ask for it again on that engine."""
    _present.pop(connection.engine, None)


#: The parent's key as text. On MariaDB/MySQL the column's collation is fixed
#: (binary), so that comparing it with ``CAST(pk AS CHAR)`` (the connection's
#: collation) can be made explicit, below, whatever the server defaults are.
_KEY_TYPE = String(100).with_variant(mysql.VARCHAR(100, charset="utf8mb4", collation="utf8mb4_bin"),
                                     "mysql", "mariadb")


class _KeyText(ColumnElement[str]):
    """``CAST(pk AS VARCHAR)``; on MariaDB/MySQL ``CAST(pk AS CHAR CHARACTER SET
    utf8mb4) COLLATE utf8mb4_bin``, the column's own collation, whatever the
    connection's character set."""

    inherit_cache = True
    type = String(100)
    _traverse_internals = [("pk", InternalTraversal.dp_clauseelement)]

    def __init__(self, pk: Any) -> None:
        self.pk = pk


@compiles(_KeyText)
def _key_text(element: _KeyText, compiler: Any, **kw: Any) -> str:
    return compiler.process(cast(element.pk, String(100)), **kw)


@compiles(_KeyText, "mysql")
@compiles(_KeyText, "mariadb")
def _key_text_mysql(element: _KeyText, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.pk, **kw)} AS CHAR CHARACTER SET utf8mb4) COLLATE utf8mb4_bin"


def table_for(counter: CounterCache) -> Table | None:
    """The side table in the counter's metadata, if it has one."""
    assert counter.column is not None
    return counter.column.table.metadata.tables.get(TABLE_NAME)


def check_present(counter: CounterCache, connection: Any) -> None:
    """Raise a :class:`CounterCacheError` naming the counter where ``connection``'s
    database has no side table for it (the first flush that holds deltas for it, or
    :func:`~countercache.exact`, :func:`~countercache.fold`, rather than the driver's
    error at the commit). A table found is remembered per engine: one catalog
    question per engine and schema."""
    check_translation(counter, connection)
    table = table_for(counter)
    if table is None:
        return
    schema = translated(connection, table.schema)
    found = _present.setdefault(connection.engine, set())
    if (schema, table.name) in found:
        return
    if not inspect(connection).has_table(table.name, schema=schema):
        raise CounterCacheError(
            f"{counter.name}: strategy {counter.strategy()!r} keeps its pending deltas in the side table "
            f"{table.name}, which the database ({connection.dialect.name}) does not have; create it "
            "(metadata.create_all(), or the migration Alembic's autogenerate writes for it)")
    found.add((schema, table.name))


def raise_if_missing(names: list[str], error: BaseException) -> None:
    """Raise a :class:`CounterCacheError` naming the counters ``names`` (from ``error``)
    where ``error`` is the database's "no such table" for the side table: its deltas had
    nowhere to go (and no question is asked of a database whose transaction failed)."""
    message = str(getattr(error, "orig", None) or error).lower()
    if names and TABLE_NAME in message and any(
            words in message for words in ("does not exist", "doesn't exist", "no such table")):
        raise CounterCacheError(
            f"{', '.join(names)}: strategy 'sharded' keeps its pending deltas in the side table "
            f"{TABLE_NAME}, which the database does not have; create it (metadata.create_all(), or the "
            "migration Alembic's autogenerate writes for it)") from error


def check_translation(counter: CounterCache, connection: Any) -> None:
    """Refuse a ``schema_translate_map`` that moves the parent's table to another
    schema but leaves the side table where it is: every tenant's shard rows
    would share one table under one counter name, and each tenant would read
    and fold the others' deltas."""
    translate = schema_translation(connection)
    if not translate:
        return
    assert counter.column is not None
    side = table_for(counter)
    parent_schema, side_schema = counter.column.table.schema, side.schema if side is not None else None
    if translate.get(parent_schema, parent_schema) != parent_schema \
            and translate.get(side_schema, side_schema) == side_schema:
        raise CounterCacheError(
            f"{counter.name}: the connection's schema_translate_map moves {counter.column.table.name} "
            f"(schema {parent_schema!r}) but not {TABLE_NAME} (schema {side_schema!r}), so every tenant's "
            f"shard rows would share one table; map {side_schema!r} too, or use strategy 'deferred'")


def counter_name(counter: CounterCache) -> str:
    """How the side table names a counter: ``"<parent table>.<column>"``."""
    assert counter.column is not None
    return f"{counter.column.table.fullname}.{counter.column.name}"


def check_shardable(counter: CounterCache, what: str, *, need_table: bool, strategy: str = "sharded") -> None:
    """Raise unless ``counter`` can be sharded (called at configuration): the side
    table's limits, the same on every database, named with ``strategy`` and its
    alternative without a side table."""
    assert counter.column is not None and counter.mapper is not None
    instead = "trigger" if strategy == "sharded_trigger" else "deferred"
    pk = list(counter.mapper.primary_key)
    key_type = pk[0].type if len(pk) == 1 else None
    if not (isinstance(key_type, Integer) or isinstance(key_type, String) and not isinstance(key_type, (Uuid, Enum))
            and key_type.length is not None and key_type.length <= KEY_LENGTH):
        # the side table keeps the key as text; a UUID's text differs between
        # backends that store it natively and those that store 32 hex digits;
        # an Enum's member is not the text stored (its name, or its value)
        raise ConfigurationError(
            f"{what}: the {strategy} strategy needs a parent with a one-column integer primary key, "
            f"or a string one of at most {KEY_LENGTH} characters (String({KEY_LENGTH}); not a Uuid or an Enum), "
            "on every database; "
            f"use strategy {instead!r}"
        )
    if not isinstance(counter.column.type, Integer):
        raise ConfigurationError(
            f"{what}: the {strategy} strategy keeps integer deltas; {counter.column.type} "
            f"counters (a decimal sum=) cannot be sharded, on any database; use strategy {instead!r}"
        )
    if need_table and table_for(counter) is None:
        raise ConfigurationError(
            f"{what}: the {strategy} strategy needs the side table {TABLE_NAME} in "
            f"{counter.cls.__name__}'s metadata; add it with "  # type: ignore[union-attr]
            "countercache.shard_table(Base.metadata) and create it in a migration"
        )


def check_shards(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise ConfigurationError(f"{what}: shards must be an integer from 1 to {MAX_SHARDS}, not {value!r}")
    return value



def key_text(pk: Any) -> Any:
    """SQL: the parent key column ``pk`` as the side table's ``parent_key`` spells it."""
    return _KeyText(pk)


def pending_expression(counter: CounterCache, parent_alias: Any = None) -> Any:
    """``coalesce(SELECT sum(delta) ... for this parent, 0)``, correlated to the parent table
    (None when the counter's metadata has no side table, or its strategy keeps no deltas
    there: rows left from when it did are not part of its value, which is the column)."""
    table = table_for(counter)
    if table is None or counter.strategy() not in SHARD_STRATEGIES:
        return None
    if counter.parent is None:  # (its class not configured yet: as a query of it would)
        configure_mappers()
    if counter.parent is None:
        raise ConfigurationError(f"{counter.name}: the counter's class is not configured; "
                                 "call sqlalchemy.orm.configure_mappers() first")
    parent_table = parent_alias if parent_alias is not None else counter.parent.table
    pk = parent_table.c[counter.parent.pk_cols[0].key]
    subquery = (
        select(cast(func.sum(table.c.delta), BigInteger))
        .where(table.c.counter == counter_name(counter), table.c.parent_key == _KeyText(pk))
        .correlate(parent_table)
        .scalar_subquery()
    )
    return func.coalesce(subquery, 0)

