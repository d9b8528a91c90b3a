"""``metadata.create_all()`` / ``drop_all()`` create and drop the triggers of
``trigger`` counters (private).

For applications without Alembic (tests, scripts, the demo): when
``create_all()`` creates the table whose rows a ``trigger`` counter counts,
the counter's triggers are created right after the tables, on the same
connection; ``drop_all()`` drops them before it drops the tables. A table
that existed already is left alone, its triggers too: changing an existing
schema is the migrations' business (``op.create_counter_trigger``). The
strategy is the one in force when ``create_all()`` runs.

The listeners are put on the metadata holding a counter's column when the
counter is bound to its class (so that a ``create_all()`` right after the
models' declaration, before any mapper is configured, sees them); they do
nothing for metadata without ``trigger`` counters, and :func:`uninstall`
removes them.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import configure_mappers

from . import _registry

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.engine import Connection

    from .declaration import CounterCache

_watched: weakref.WeakSet[MetaData] = weakref.WeakSet()


def watch(metadata: MetaData) -> None:
    """Create and drop ``metadata``'s trigger counters with its tables (idempotent)."""
    if metadata in _watched:
        return
    event.listen(metadata, "before_create", _before_create)
    event.listen(metadata, "after_create", _after_create)
    event.listen(metadata, "before_drop", _before_drop)
    _watched.add(metadata)


def uninstall() -> None:
    for metadata in list(_watched):
        for name, fn in (("before_create", _before_create), ("after_create", _after_create),
                         ("before_drop", _before_drop)):
            if event.contains(metadata, name, fn):
                event.remove(metadata, name, fn)
    _watched.clear()


def counted_table(counter: CounterCache) -> Any:
    """The table whose rows fire the counter's triggers (a multi-level counter's leaves)."""
    from .trigger_sql import counted_table as counted

    return counted(counter)


def trigger_counters(metadata: MetaData, tables: Any = None) -> list[CounterCache]:
    """The resolved ``trigger`` counters whose counted table is in ``metadata``
    (and among ``tables``, when given), in a stable order."""
    from .config import DATABASE_STRATEGIES

    configure_mappers()
    found = []
    for counter in _registry.all_counters():
        if counter.kind is None or counter.column is None or counter.strategy() not in DATABASE_STRATEGIES:
            continue
        table = counted_table(counter)
        if table.metadata is metadata and (tables is None or table in tables):
            found.append(counter)
    return sorted(found, key=lambda c: c.name)


def create(connection: Connection, counter: CounterCache) -> None:
    from . import triggers
    from .errors import CounterCacheError
    from .strategies.trigger import forget_verified

    refused = triggers.refusal(counter, connection.dialect) or triggers.translated(connection, counter)
    if refused is not None:
        raise CounterCacheError(refused)
    # (dropped first if there: a parent table's triggers outlive a dropped counted table)
    triggers.execute(connection, triggers.drop_statements(counter, connection.dialect)
                     + triggers.create_statements(counter, connection.dialect))
    forget_verified()


def drop(connection: Connection, counter: CounterCache) -> None:
    from . import triggers
    from .strategies.trigger import forget_verified

    if triggers.refusal(counter, connection.dialect) is not None or triggers.translated(connection, counter):
        return  # (under a schema_translate_map: never the untranslated tables' triggers)
    triggers.execute(connection, triggers.drop_statements(counter, connection.dialect))
    forget_verified()


def _before_create(metadata: MetaData, connection: Connection, tables: Any = None, **kw: Any) -> None:
    """Refuse before any table is made (SQLite and MariaDB would keep the tables
    made before a refusal, and the next ``create_all()`` would skip them)."""
    from sqlalchemy import inspect

    from . import triggers
    from .errors import CounterCacheError

    try:
        found = trigger_counters(metadata, tables)
    finally:  # (a counter refused at mapper configuration, now or before: refused here too, every time)
        broken = _registry.failed_in(list(metadata.tables.values()) if tables is None else tables) \
            if _registry.failed else None
        if broken is not None:
            raise _registry.failure(*broken)
    for counter in found:
        refused = triggers.refusal(counter, connection.dialect) or triggers.translated(connection, counter)
        if refused is not None:
            raise CounterCacheError(refused)
        parent = counter.column.table  # type: ignore[union-attr]
        if tables is not None and parent not in tables \
                and not inspect(connection).has_table(parent.name, schema=parent.schema):
            raise CounterCacheError(
                f"{counter.name}: create_all() makes {counted_table(counter).name} here, but {parent.name} "
                "is not in this database, and a trigger keeps a counter within one database; "
                "use strategy 'bulk'")


def _after_create(metadata: MetaData, connection: Connection, tables: Any = None, **kw: Any) -> None:
    for counter in trigger_counters(metadata, tables):
        create(connection, counter)


def _before_drop(metadata: MetaData, connection: Connection, tables: Any = None, **kw: Any) -> None:
    for counter in trigger_counters(metadata, tables):
        drop(connection, counter)
