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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, Table, and_, any_, bindparam, func, inspect, literal, select, tuple_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, scoped_session

from . import _registry, commit, memory, transactions
from .errors import CounterCacheError
from .repair import _connection
from .scope import counters_for
from .sessions import bind_of, session_of
from .strategies import STRATEGY_CLASSES
from .sidetable import TABLE_NAME as TABLE_NAME
from .sidetable import check_present, check_translation, counter_name, pending_expression, shard_table as shard_table, table_for

if TYPE_CHECKING:
    from .declaration import CounterCache

__all__ = ["TABLE_NAME", "shard_table", "exact", "exact_expression", "fold"]

#: Times fold() runs a batch again (Engine bind) after losing a deadlock: on
#: MariaDB a writer's foreign-key check holds a shared lock on the parent row.
DEADLOCK_RETRIES = 3

#: Parents per fold batch.
FOLD_BATCH = 1000

# -- reading ------------------------------------------------------------------


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
    definition = _registry.lookup(counter)
    column = getattr(definition.cls, definition.key)  # type: ignore[arg-type]
    alias = None
    if hasattr(counter, "__clause_element__"):  # (an aliased() class's attribute: correlated to that alias)
        selectable = getattr(counter.__clause_element__(), "table", None)
        if selectable is not None and not isinstance(selectable, Table):
            column, alias = counter, selectable
    pending = pending_expression(definition, alias)
    return column if pending is None else column + pending


def exact(session: Any, instance: Any, counter: str) -> int:
    """The exact value of ``instance``'s counter called ``counter``, read now.

    ``exact(session, user, "question_count")``: the parent column plus the
    deltas pending in the side table, plus what this session's transaction
    holds for that parent until its commit (``sharded`` and ``deferred``
    counters). Works for every strategy; for ``bulk`` and ``per_row`` it is
    the column as this transaction sees it. Accepts a
    :class:`~sqlalchemy.orm.Session`, a
    :class:`~sqlalchemy.orm.scoped_session`, or (inside ``run_sync()``) an
    :class:`~sqlalchemy.ext.asyncio.AsyncSession`.
    """
    sync = session_of(session, "exact")
    state = inspect(instance)
    if isinstance(counter, str) and not hasattr(type(instance), counter):
        raise CounterCacheError(f"{type(instance).__name__}.{counter}: no such counter")
    definition = _registry.lookup(getattr(type(instance), counter) if isinstance(counter, str) else counter)
    if state.key is None or definition.parent is None:
        raise CounterCacheError(f"{definition.name}: exact() needs a persistent parent instance")
    sync.flush()
    parent = definition.parent
    key = tuple(state.key[1])
    statement = select(exact_expression(getattr(definition.cls, definition.key))).where(  # type: ignore[arg-type]
        *(col == value for col, value in zip(parent.pk_cols, key)))
    connection = sync.connection(bind_arguments={"mapper": parent.mapper})
    if table_for(definition) is not None:
        if STRATEGY_CLASSES[definition.strategy()].uses_shard_table:
            check_present(definition, connection)
        else:
            check_translation(definition, connection)
    value = connection.scalar(statement)
    if value is None:
        raise CounterCacheError(f"{definition.name}: no parent row with key {key!r}")
    return value + commit.held_delta(sync, parent, key, definition.slot)


# -- folding ------------------------------------------------------------------


def fold(bind: Engine | Connection | Session | scoped_session[Any], *counters: Any, batch_size: int = FOLD_BATCH,
         progress: Callable[[CounterCache, int], None] | None = None, metadata: Any = None) -> int:
    """Move pending shard deltas into the parent columns; return the shard rows folded.

    :param bind: an Engine (each batch commits by itself), or a Connection
        or Session (the caller's transaction; the caller commits); a
        ``scoped_session`` stands for its current session.
    :param counters: counter attributes or names; when none is given,
        every counter of a side table in the bind's database (as
        :func:`~countercache.check` chooses them; none there: nothing to do).
    :param batch_size: parents per batch (each with up to ``shards`` rows).
    :param progress: ``progress(counter, shard_rows_done)`` after each batch.
    :param metadata: a MetaData, or several: only their counters.

    Each batch, in one transaction, locks its parent rows in key order (as
    every writer that locks parent rows does), deletes the batch's shard rows
    with ``DELETE ... RETURNING`` (PostgreSQL, MariaDB, SQLite; on MySQL a
    locking ``SELECT`` first) and adds what it deleted to the parents. The
    DELETE removes exactly the rows whose deltas it returns: a writer's
    upsert that commits before it is in the returned delta, one that waits
    for it inserts a new row afterwards, folded next time; none is counted
    twice or lost. Parents in a Session's memory are expired.
    """
    if batch_size < 1:
        raise CounterCacheError(f"batch_size must be at least 1, not {batch_size}")
    bind = bind_of(bind, "fold")
    total = 0
    for counter in counters_for(bind, counters, metadata, only=lambda c: table_for(c) is not None, recount=False):
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
                            check_present(counter, conn)
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
                    transactions.remember_refreshed(bind, counter.parent, keys)  # type: ignore[arg-type]
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
