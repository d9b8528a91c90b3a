"""``trigger``: the database keeps the counter, with triggers generated from
the declaration (:mod:`countercache.triggers`).

The writing statement itself (an INSERT, UPDATE or DELETE of child rows,
whoever sends it: the ORM, a Core statement on a connection, raw SQL,
another application, a foreign key's ``ON DELETE CASCADE``) fires the
triggers, which change the counter in the same statement. The ORM side
writes nothing: what change tracking finds for these counters only tells
which parents in memory the flush changed, and those get the new value
(expired, or read back where the commit keeps them: ``expire_on_commit=False``),
as for the other strategies.

Before a session first relies on the triggers of a counter on a database,
it checks once (per engine) that they are there: a counter whose triggers
were never created (no migration, no ``create_all()``) raises
:class:`~countercache.CounterCacheError` naming it instead of drifting.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from ..errors import CounterCacheError
from ._base import Strategy

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ..declaration import CounterCache

#: engine -> names of the trigger counters found installed on it
_verified: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def verify_installed(connection: Connection, counter: CounterCache) -> None:
    """Raise unless ``counter``'s triggers exist on ``connection``'s database
    (asked once per engine and counter)."""
    from .. import triggers

    engine = connection.engine
    base = triggers.trigger_name(counter)  # (its definition and strategy: a change is asked again)
    found = _verified.get(engine)
    if found is not None and base in found:
        return
    refused = triggers.refusal(counter, connection.dialect) or triggers.translated(connection, counter)
    if refused is not None:
        raise CounterCacheError(refused)
    if not triggers.installed(connection, counter):
        raise CounterCacheError(
            f"{counter.name}: strategy {counter.strategy()!r}, but the database ({connection.dialect.name}) has no "
            f"countercache trigger for it: create it with the migration "
            f"(op.create_counter_trigger) or metadata.create_all(), or choose an ORM strategy such as 'bulk'")
    others = sorted(b for b in _stale_alike(connection, counter) if b != base)
    if others:
        raise CounterCacheError(
            f"{counter.name}: the database ({connection.dialect.name}) also has countercache triggers "
            f"{', '.join(others)} of another definition or strategy, and both would count: drop them "
            "(op.drop_counter_trigger(..., name=...))")
    _verified.setdefault(engine, set()).add(base)


def _stale_alike(connection: Connection, counter: CounterCache) -> list[str]:
    """The base names of installed countercache triggers that may be the counter's own,
    of any definition or strategy: named as its names read before their hash (its parent
    table and column, shortened), less those that are another declared counter's
    triggers now (``n`` and ``n_open``; ``users.post_count`` and ``users_post.count``;
    long table names cut alike; another declared definition of its own column is not)."""
    from .. import _registry, triggers

    body = triggers.trigger_name(counter).rsplit("_", 1)[0]
    schema = counter.column.table.schema  # type: ignore[union-attr]
    counted = triggers.counted_table(counter).name.lower()  # (on its own counted table, not one named alike)
    alike = [b for b, table in triggers.installed_bases(connection, schema).items()
             if b.rsplit("_", 1)[0] == body and table.lower() == counted]
    if not alike:
        return alike
    column = counter.column
    where = (column.table.schema, column.table.name, column.name)  # type: ignore[union-attr]
    current = set()
    for other in _registry.all_counters():  # (another definition of this counter's column is stale)
        if other.column is not None and other.kind is not None and \
                (other.column.table.schema, other.column.table.name, other.column.name) != where:
            try:
                current.add(triggers.trigger_name(other))
            except Exception:  # noqa: BLE001 - (not resolvable now: not one whose triggers these are)
                continue
    return [b for b in alike if b not in current]


def forget_verified() -> None:
    """Ask again (after triggers were dropped or created behind the library's back)."""
    _verified.clear()
    _gone.clear()
    clean.clear()


#: engine -> names of the ORM-kept counters found without triggers on it
_gone: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
#: engine -> (configuration generation, written mappers) whose ORM-kept counters have no triggers there
clean: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()


def verify_gone(connection: Connection, counter: CounterCache) -> None:
    """Raise if an ORM-kept counter still has countercache triggers in the database
    (configured away from ``trigger``, or a migration that left them): they and the
    ORM strategy would both count; asked once per engine."""
    engine = connection.engine
    found = _gone.get(engine)
    if found is not None and counter.name in found:
        return
    # (by name, whatever they were made for: trigger's or sharded_trigger's, any definition)
    if _stale_alike(connection, counter):
        raise CounterCacheError(
            f"{counter.name}: strategy {counter.strategy()!r} now, but the database ({connection.dialect.name}) "
            "still has its countercache triggers, and both would count: drop them first "
            "(op.drop_counter_trigger in a migration), or keep strategy 'trigger'")
    _gone.setdefault(engine, set()).add(counter.name)


class TriggerStrategy(Strategy):
    name = "trigger"
    #: the database writes the parent rows, in the child row's statement
    writes_rows = False

    def __init__(self, flush: Any) -> None:
        super().__init__(flush)
        self.verified: set[CounterCache] = set()

    def add(self, counter: CounterCache, key: tuple[Any, ...], delta: int) -> None:
        if counter not in self.verified:
            verify_installed(self.flush.connection_for(counter.parent), counter)  # type: ignore[arg-type]
            self.verified.add(counter)
        super().add(counter, key, delta)

    def write(self, connection_for: Any = None, connection: Connection | None = None) -> None:
        """Nothing to write: show the new values on the parents in memory."""
        pending = self.pending
        if not pending:
            return
        self.pending = {}
        flush = self.flush
        for parent, deltas in pending.items():
            keys = [key for key, vector in deltas.items() if any(vector)]
            if keys and flush.holds_any(parent, keys):
                flush.results.append((parent, [(key, None) for key in keys]))

    def flush_done(self) -> None:
        self.write()


class ShardedTriggerStrategy(TriggerStrategy):
    """``sharded_trigger``: as ``trigger``, but the triggers add each statement's
    deltas to a shard row of ``countercache_shards`` (:mod:`countercache.triggers_sharded`),
    never to the parent row; the column lags until :func:`countercache.fold`."""

    name = "sharded_trigger"
    uses_shard_table = True
