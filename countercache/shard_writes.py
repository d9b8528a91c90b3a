"""Writing the ``sharded`` strategy's shard rows, at commit (private).

Each transaction adds its net delta per parent to one of N rows of the side
table (:mod:`countercache.sidetable`) with an atomic upsert (``INSERT ... ON
CONFLICT ... DO UPDATE SET delta = delta + excluded.delta``; ``ON DUPLICATE
KEY UPDATE`` on MariaDB/MySQL). Each pooled connection keeps one shard
number, so concurrent transactions (which hold different connections) land
on different rows.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, event
from sqlalchemy.engine import Connection

from . import _execute
from .errors import CounterCacheError
from .sidetable import MAX_SHARDS, check_shardable, check_translation, counter_name, table_for

if TYPE_CHECKING:
    from .writer import Deltas, ParentTable

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
          deleted: dict[ParentTable, set[tuple[Any, ...]]] | None = None, queued: bool = False) -> None:
    """Add a transaction's net deltas to its shard rows: one upsert per side table.

    Rows are written in (counter, parent key) order, so two transactions that
    happen to share a shard lock their rows in the same order. Parents the
    transaction deleted lose the rows they had (a new parent with the same
    key must not inherit them; what the transaction held for the deleted row
    was taken back when it was deleted: transactions.take_back).

    ``queued``: the statements go with the COMMIT (:mod:`countercache.riding`),
    unanswered: one multi-row ``INSERT ... VALUES`` (one statement in the
    COMMIT's message, where an executemany would be one per row).
    """
    deleted = deleted or {}
    for parent, keys in deleted.items():
        _forget_parents(connection_for(parent), parent, keys)
    by_table: dict[tuple[Table, Connection], list[dict[str, Any]]] = {}
    for parent, deltas in pending.items():
        connection = connection_for(parent)
        slot = _slot(connection)
        if parent.string_keys:  # (the side table matches parent keys as text: the stored spelling)
            deltas = parent.stored_spellings(connection, deltas)
        # per counter slot, looked up on first use: (its rows, its name, its shard)
        targets: dict[int, tuple[list[dict[str, Any]], str, int]] = {}
        for key, vector in deltas.items():
            for index, delta in enumerate(vector):
                if not delta:
                    continue
                target = targets.get(index)
                if target is None:
                    counter = parent.counters[index]
                    table = table_for(counter)
                    if table is None:
                        check_shardable(counter, counter.name, need_table=True)
                    check_translation(counter, connection)
                    rows = by_table.setdefault((table, connection), [])  # type: ignore[arg-type]
                    target = targets[index] = (rows, counter_name(counter), slot % counter.shards())
                rows, name, shard = target
                rows.append({"counter": name, "parent_key": str(key[0]), "shard": shard, "delta": int(delta)})
    for (table, connection), rows in by_table.items():
        rows.sort(key=lambda r: (r["counter"], r["parent_key"], r["shard"]))
        stmt = _upsert(table, connection.dialect.name)
        if queued and len(rows) > 1:  # (one statement, its rows in its VALUES)
            connection.execute(stmt.values(rows))
        elif len(rows) == 1:
            _execute.execute(connection, stmt, rows[0])
        else:
            connection.execute(stmt, rows)


def rekey(connection: Connection, parent: ParentTable, old: tuple[Any, ...], new: tuple[Any, ...]) -> None:
    """A parent's primary key changed from ``old`` to ``new``: its shard rows follow it."""
    for table, names in _tables(parent).items():
        connection.execute(table.update()
                           .where(table.c.counter.in_(names), table.c.parent_key == str(old[0]))
                           .values(parent_key=str(new[0])))


def _tables(parent: ParentTable) -> dict[Table, list[str]]:
    """The side tables of the parent's counters, with the counters' names in each."""
    tables: dict[Table, list[str]] = {}
    for counter in parent.counters:
        table = table_for(counter)
        if table is not None:
            tables.setdefault(table, []).append(counter_name(counter))
    return tables


def _forget_parents(connection: Connection, parent: ParentTable, keys: set[tuple[Any, ...]]) -> None:
    texts = sorted(str(k[0]) for k in keys)
    for table, names in _tables(parent).items():
        connection.execute(table.delete().where(table.c.counter.in_(names), table.c.parent_key.in_(texts)))


def forget(connection: Connection, parent: ParentTable, keys: set[tuple[Any, ...]]) -> None:
    """Delete the shard rows of the parents ``keys`` now (their rows are gone)."""
    _forget_parents(connection, parent, keys)
