"""The ``sharded`` strategy's side table: writing shard rows, exact reads, folding.

A hot parent (a viral post, a popular tag) makes every writer of a counter
on its row wait for that row's lock. A ``sharded`` counter does not write
the parent row at all: each transaction adds its net delta, at commit, to
one of N rows of the side table ``countercache_shards``::

    counter     | parent_key | shard | delta
    users.question_count | 42 | 3     | 17

with an atomic upsert (``INSERT ... ON CONFLICT ... DO UPDATE SET delta =
delta + excluded.delta``; ``ON DUPLICATE KEY UPDATE`` on MariaDB/MySQL).
Each pooled connection keeps one shard number, so concurrent transactions
(which hold different connections) land on different rows.

Reading:

* the parent column (``user.question_count``) is the folded value: it lags
  by the deltas not yet folded;
* :func:`exact` and :func:`exact_expression` add the pending deltas, so they
  are exact (``exact`` also adds what the caller's own transaction will write
  at commit).

:func:`fold` moves pending deltas into the parent columns in batches; each
batch locks its parents, then deletes their shard rows with ``DELETE ...
RETURNING`` and adds what it deleted to the parents, in one transaction, so
no delta is counted twice or lost while writers keep writing.

The side table lives in the application's ``MetaData`` (it appears in
migrations like any table): a counter declared with ``strategy="sharded"``
adds it; :func:`shard_table` adds it for counters switched to ``sharded`` by
configuration.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Uuid,
    and_,
    any_,
    bindparam,
    cast,
    event,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from .errors import ConfigurationError, CounterCacheError

if TYPE_CHECKING:
    from .declaration import CounterCache
    from .writer import Deltas, ParentTable

__all__ = ["TABLE_NAME", "DEFAULT_SHARDS", "shard_table", "exact", "exact_expression", "fold"]

TABLE_NAME = "countercache_shards"
DEFAULT_SHARDS = 16
MAX_SHARDS = 1024

#: Characters of a parent's key in the side table.
KEY_LENGTH = 100

#: Times fold() runs a batch again (Engine bind) after losing a deadlock: on
#: MariaDB a writer's foreign-key check holds a shared lock on the parent row.
DEADLOCK_RETRIES = 3

#: Parents per fold batch.
FOLD_BATCH = 1000


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
    )


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


def counter_name(counter: CounterCache) -> str:
    """How the side table names a counter: ``"<parent table>.<column>"``."""
    assert counter.column is not None
    return f"{counter.column.table.fullname}.{counter.column.name}"


def check_shardable(counter: CounterCache, what: str, *, need_table: bool) -> None:
    """Raise unless ``counter`` can be sharded (called at configuration)."""
    assert counter.column is not None and counter.mapper is not None
    pk = list(counter.mapper.primary_key)
    key_type = pk[0].type if len(pk) == 1 else None
    if not (isinstance(key_type, Integer) or isinstance(key_type, String) and not isinstance(key_type, Uuid)
            and key_type.length is not None and key_type.length <= KEY_LENGTH):
        # the side table keeps the key as text; a UUID's text differs between
        # backends that store it natively and those that store 32 hex digits
        raise ConfigurationError(
            f"{what}: the sharded strategy needs a parent with a one-column integer primary key, "
            f"or a string one of at most {KEY_LENGTH} characters (String({KEY_LENGTH}))"
        )
    if not isinstance(counter.column.type, Integer):
        raise ConfigurationError(
            f"{what}: the sharded strategy keeps integer deltas; {counter.column.type} "
            "counters (a decimal sum=) cannot be sharded"
        )
    if need_table and table_for(counter) is None:
        raise ConfigurationError(
            f"{what}: the sharded strategy needs the side table {TABLE_NAME} in "
            f"{counter.cls.__name__}'s metadata; add it with "  # type: ignore[union-attr]
            "countercache.shard_table(Base.metadata) and create it in a migration"
        )


def check_shards(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SHARDS:
        raise ConfigurationError(f"{what}: shards must be an integer from 1 to {MAX_SHARDS}, not {value!r}")
    return value


# -- writing ------------------------------------------------------------------

class _PoolSlots:
    """The shard slots of one connection pool's live connections.

    A connection writing shards for the first time takes the lowest slot no
    live connection of its pool holds, counted from the pool's random start,
    and gives it back when the pool closes or detaches it. So the
    connections of a pool of up to ``shards`` connections never share a shard
    row, however many connections the pool opened and closed before.
    """

    def __init__(self, pool: Any) -> None:
        self.start = random.SystemRandom().randrange(MAX_SHARDS)
        self.taken: set[int] = set()
        self.lock = threading.RLock()  # a connection collected inside take() closes on this thread
        # given back when the pool closes the connection, or lets go of it (detach())
        for name in _POOL_EVENTS:
            event.listen(pool, name, self._closed)

    def take(self) -> int:
        with self.lock:
            n = 0
            while n in self.taken:
                n += 1
            self.taken.add(n)
            return n

    def _closed(self, dbapi_connection: Any, record: Any) -> None:
        held = record.info.get(_INFO_KEY)
        if held is not None and held[0] is self:  # not a slot of an earlier allocator (uninstall, fork)
            with self.lock:
                self.taken.discard(held[1])


#: (process id, pool -> its slots): a forked worker starts afresh.
_pools: tuple[int, weakref.WeakKeyDictionary[Any, _PoolSlots]] = (-1, weakref.WeakKeyDictionary())
_pools_lock = threading.RLock()
_INFO_KEY = "countercache_shard_slot"
_POOL_EVENTS = ("close", "detach")


def _slot(connection: Connection) -> int:
    """This connection's shard slot (taken on first use, kept across checkouts)."""
    global _pools
    info = connection.connection.info  # the pooled DBAPI connection's (cleared when it is replaced)
    pool = connection.engine.pool
    with _pools_lock:
        pid, pools = _pools
        if pid != os.getpid():
            pid, pools = _pools = (os.getpid(), weakref.WeakKeyDictionary())
        slots = pools.get(pool)
        if slots is None:
            slots = pools[pool] = _PoolSlots(pool)
    held = info.get(_INFO_KEY)
    if held is None or held[0] is not slots:
        # (allocator, number): a slot from before an uninstall() or a fork is not this pool's now
        held = info[_INFO_KEY] = (slots, slots.take())
    return slots.start + held[1]


def forget_pools() -> None:
    """``uninstall()``: remove the pools' close listeners (a connection keeps the slot it has)."""
    global _pools
    with _pools_lock:
        pools = _pools[1]
        _pools = (-1, weakref.WeakKeyDictionary())
    for pool, slots in list(pools.items()):
        for name in _POOL_EVENTS:
            if event.contains(pool, name, slots._closed):
                event.remove(pool, name, slots._closed)


#: side table -> {dialect name: upsert statement}
_statements: weakref.WeakKeyDictionary[Table, dict[str, Any]] = weakref.WeakKeyDictionary()


def _upsert(table: Table, dialect: str) -> Any:
    by_dialect = _statements.get(table)
    if by_dialect is None:
        by_dialect = _statements[table] = {}
    found = by_dialect.get(dialect)
    if found is not None:
        return found
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects.mysql import insert as mysql_insert

        ins = mysql_insert(table)
        stmt = ins.on_duplicate_key_update(delta=table.c.delta + ins.inserted.delta)
    else:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
        else:
            raise CounterCacheError(f"the sharded strategy does not support the {dialect} dialect")
        ins = dialect_insert(table)
        stmt = ins.on_conflict_do_update(
            index_elements=[table.c.counter, table.c.parent_key, table.c.shard],
            set_={"delta": table.c.delta + ins.excluded.delta},
        )
    by_dialect[dialect] = stmt
    return stmt


def write(connection_for: Callable[[ParentTable], Connection], pending: dict[ParentTable, Deltas],
          deleted: dict[ParentTable, set[tuple[Any, ...]]] | None = None) -> None:
    """Add a transaction's net deltas to its shard rows: one upsert per side table.

    Rows are written in (counter, parent key) order, so two transactions that
    happen to share a shard lock their rows in the same order. Parents the
    transaction deleted get no rows, and lose the ones they had (a new parent
    with the same key must not inherit them).
    """
    deleted = deleted or {}
    for parent, keys in deleted.items():
        _forget_parents(connection_for(parent), parent, keys)
    by_table: dict[tuple[Table, Connection], list[dict[str, Any]]] = {}
    for parent, deltas in pending.items():
        connection = connection_for(parent)
        slot = _slot(connection)
        gone = deleted.get(parent, ())
        # per counter slot, looked up on first use: (its rows, its name, its shard)
        targets: dict[int, tuple[list[dict[str, Any]], str, int]] = {}
        for key, vector in deltas.items():
            if key in gone:
                continue
            for index, delta in enumerate(vector):
                if not delta:
                    continue
                target = targets.get(index)
                if target is None:
                    counter = parent.counters[index]
                    table = table_for(counter)
                    if table is None:
                        check_shardable(counter, counter.name, need_table=True)
                    rows = by_table.setdefault((table, connection), [])  # type: ignore[arg-type]
                    target = targets[index] = (rows, counter_name(counter), slot % counter.shards())
                rows, name, shard = target
                rows.append({"counter": name, "parent_key": str(key[0]), "shard": shard, "delta": int(delta)})
    for (table, connection), rows in by_table.items():
        rows.sort(key=lambda r: (r["counter"], r["parent_key"], r["shard"]))
        stmt = _upsert(table, connection.dialect.name)
        connection.execute(stmt, rows[0] if len(rows) == 1 else rows)


def _forget_parents(connection: Connection, parent: ParentTable, keys: set[tuple[Any, ...]]) -> None:
    tables: dict[Table, list[str]] = {}
    for counter in parent.counters:
        table = table_for(counter)
        if table is not None:
            tables.setdefault(table, []).append(counter_name(counter))
    texts = sorted(str(k[0]) for k in keys)
    for table, names in tables.items():
        connection.execute(table.delete().where(table.c.counter.in_(names), table.c.parent_key.in_(texts)))


def parent_deleted(mapper: Any, connection: Connection, state: Any) -> None:
    """Parent mapper ``after_delete``: a parent with sharded counters is gone."""
    from . import tracking, transactions
    from .writer import ParentTable

    session = tracking.flushing_session(state)
    if session is None:
        return
    for parent in ParentTable.of_mapper(mapper):
        if any(c.strategy() == "sharded" for c in parent.counters):
            transactions.parent_deleted(session, parent, tuple(state.key[1]))


# -- reading ------------------------------------------------------------------


def pending_expression(counter: CounterCache, parent_alias: Any = None) -> Any:
    """``coalesce(SELECT sum(delta) ... for this parent, 0)``, correlated to the parent table
    (None when the counter's metadata has no side table)."""
    table = table_for(counter)
    if table is None:
        return None
    assert counter.parent is not None
    parent_table = parent_alias if parent_alias is not None else counter.parent.table
    pk = parent_table.c[counter.parent.pk_cols[0].key]
    subquery = (
        select(cast(func.sum(table.c.delta), BigInteger))
        .where(table.c.counter == counter_name(counter), table.c.parent_key == _KeyText(pk))
        .correlate(parent_table)
        .scalar_subquery()
    )
    return func.coalesce(subquery, 0)


def exact_expression(counter: Any) -> Any:
    """A SQL expression of a counter's exact value: the column plus its pending shard deltas.

    Usable wherever a column is, in the select list, ``order_by`` or
    ``where``::

        exact = countercache.exact_expression(User.question_count)
        session.scalars(select(User).order_by(exact.desc()).limit(10))

    For a counter of any other strategy (or with no side table) it is the
    column itself. It sees committed deltas, not those the current
    transaction will write at its commit (:func:`exact` adds those).
    """
    from . import _registry

    definition = _registry.lookup(counter)
    column = getattr(definition.cls, definition.key)  # type: ignore[arg-type]
    pending = pending_expression(definition)
    return column if pending is None else column + pending


def exact(session: Any, instance: Any, counter: str) -> int:
    """The exact value of ``instance``'s counter called ``counter``, read now.

    ``exact(session, user, "question_count")``: the parent column plus the
    deltas pending in the side table, plus what this session's transaction
    holds for that parent until its commit (``sharded`` and ``deferred``
    counters). Works for every strategy; for ``bulk`` and ``per_row`` it is
    the column as this transaction sees it. Accepts a
    :class:`~sqlalchemy.orm.Session` or an
    :class:`~sqlalchemy.ext.asyncio.AsyncSession`'s ``sync_session``.
    """
    from sqlalchemy import inspect as sa_inspect

    from . import _registry, transactions

    sync = getattr(session, "sync_session", session)
    state = sa_inspect(instance)
    definition = _registry.lookup(getattr(type(instance), counter, counter)
                                  if isinstance(counter, str) else counter)
    if state.key is None or definition.parent is None:
        raise CounterCacheError(f"{definition.name}: exact() needs a persistent parent instance")
    sync.flush()
    parent = definition.parent
    key = tuple(state.key[1])
    statement = select(exact_expression(getattr(definition.cls, definition.key))).where(  # type: ignore[arg-type]
        *(col == value for col, value in zip(parent.pk_cols, key)))
    value = sync.connection(bind_arguments={"mapper": parent.mapper}).scalar(statement)
    if value is None:
        raise CounterCacheError(f"{definition.name}: no parent row with key {key!r}")
    return value + transactions.held_delta(sync, parent, key, definition.slot)


# -- folding ------------------------------------------------------------------


def fold(bind: Engine | Connection | Session, *counters: Any, batch_size: int = FOLD_BATCH,
         progress: Callable[[CounterCache, int], None] | None = None) -> int:
    """Move pending shard deltas into the parent columns; return the shard rows folded.

    :param bind: an Engine (each batch commits by itself), or a Connection
        or Session (the caller's transaction; the caller commits).
    :param counters: counter attributes or names; every counter of every
        side table when none is given.
    :param batch_size: parents per batch (each with up to ``shards`` rows).
    :param progress: ``progress(counter, shard_rows_done)`` after each batch.

    Each batch, in one transaction, locks its parent rows in key order (as
    every writer that locks parent rows does), deletes the batch's shard rows
    with ``DELETE ... RETURNING`` (PostgreSQL, MariaDB, SQLite; on MySQL a
    locking ``SELECT`` first) and adds what it deleted to the parents. The
    DELETE removes exactly the rows whose deltas it returns: a writer's
    upsert that commits before it is in the returned delta, one that waits
    for it inserts a new row afterwards, folded next time; none is counted
    twice or lost. Parents in a Session's memory are expired.
    """
    from .repair import _connection, resolve_counters

    if batch_size < 1:
        raise CounterCacheError(f"batch_size must be at least 1, not {batch_size}")
    total = 0
    for counter in resolve_counters(counters):
        table = table_for(counter)
        if table is None:
            continue
        name = counter_name(counter)
        done = 0
        with _connection(bind, counter, per_batch=True) as batch:
            after: str | None = None
            while True:
                for attempt in range(DEADLOCK_RETRIES + 1):
                    try:
                        with batch() as conn:
                            keys, rows, after_batch = _fold_batch(conn, table, counter, name, after, batch_size)
                        break
                    except DBAPIError as exc:
                        # a batch of its own (Engine) that lost a deadlock: run it again
                        if not isinstance(bind, Engine) or attempt == DEADLOCK_RETRIES or not _deadlock(exc):
                            raise
                after = after_batch
                if not keys:
                    break
                if isinstance(bind, Session):
                    from . import memory

                    memory.expire(bind, counter.parent, keys)  # type: ignore[arg-type]
                done += rows
                if progress is not None:
                    progress(counter, done)
        total += done
    return total


def _fold_batch(conn: Connection, table: Table, counter: CounterCache, name: str,
                after: str | None, size: int) -> tuple[list[tuple[Any, ...]], int, str | None]:
    """One batch of parents: ``(parent keys, shard rows folded, last parent_key)``."""
    parent = counter.parent
    assert parent is not None
    c = table.c
    # the next parents with pending rows (no lock: the DELETE below says what they hold)
    stmt = select(c.parent_key).distinct().where(c.counter == name)
    if after is not None:
        stmt = stmt.where(c.parent_key > after)
    texts = list(conn.scalars(stmt.order_by(c.parent_key).limit(size)))
    if not texts:
        return [], 0, after
    pk_col = parent.pk_cols[0]
    to_key = _key_converter(pk_col)
    keys = sorted({to_key(t) for t in texts})
    dialect = conn.dialect
    postgresql = dialect.name == "postgresql"
    if postgresql:  # one array parameter each, not 1,000 placeholders
        parent_in = pk_col == any_(bindparam("fold_keys", keys, type_=ARRAY(pk_col.type)))
        texts_in = c.parent_key == any_(bindparam("fold_texts", texts, type_=ARRAY(String(100))))
    else:
        parent_in, texts_in = pk_col.in_(keys), c.parent_key.in_(texts)
    if dialect.name != "sqlite":
        # parents first, as every writer that locks parent rows does
        conn.execute(select(pk_col).where(parent_in).order_by(pk_col).with_for_update(key_share=postgresql))
    which = and_(c.counter == name, texts_in)
    if postgresql:  # summed in the database: one row per parent comes back
        gone = table.delete().where(which).returning(c.parent_key, c.delta).cte("gone")
        deleted = conn.execute(select(gone.c.parent_key, func.sum(gone.c.delta), func.count())
                               .group_by(gone.c.parent_key)).all()
    elif dialect.delete_returning:
        deleted = conn.execute(table.delete().where(which).returning(c.parent_key, c.delta, literal(1))).all()
    else:  # MySQL: lock and read, then delete exactly the rows read (under READ
        # COMMITTED a row inserted in between is not in the read: it stays pending)
        read = conn.execute(select(c.parent_key, c.shard, c.delta).where(which)
                            .order_by(c.parent_key, c.shard).with_for_update()).all()
        if read:
            conn.execute(table.delete().where(
                c.counter == name, tuple_(c.parent_key, c.shard).in_([(r[0], r[1]) for r in read])))
        deleted = [(r[0], r[2], 1) for r in read]
    deltas: dict[tuple[Any, ...], list[int]] = {}
    rows = 0
    for parent_key, delta, count in deleted:
        vector = deltas.setdefault((to_key(parent_key),), parent.new_vector())
        vector[counter.slot] += int(delta)
        rows += count
    if deltas:
        parent.apply(conn, deltas, values=False)
    return [(k,) for k in keys], rows, texts[-1]


def _deadlock(exc: DBAPIError) -> bool:
    """PostgreSQL's deadlock_detected (40P01), MariaDB/MySQL's 1213."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "40P01":
        return True
    args = getattr(orig, "args", ())
    return bool(args) and args[0] == 1213


def _key_converter(pk_col: Any) -> Callable[[str], Any]:
    try:
        python_type = pk_col.type.python_type
    except NotImplementedError:
        return lambda s: s
    if python_type is str:
        return lambda s: s
    return python_type  # type: ignore[no-any-return]
