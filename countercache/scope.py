"""Which counters :func:`~countercache.check`, :func:`~countercache.reconcile`
and :func:`~countercache.fold` cover (private).

Counters named are taken as named: each must belong to ``metadata`` when it
is given, and its tables must be in the database it is read from, or a
:class:`~countercache.CounterCacheError` names the counter and what is
missing. With none named, they cover the counters of that database: every
resolved counter (of ``metadata``, when given) whose parent table and the
tables its recount reads all exist in the database the bind reaches for it.
An application with two declarative bases on two databases checks each
with its own engine. The database is the bind itself for an Engine or a
Connection; for a Session, the bind the counter's parent mapper resolves to
(``Session.get_bind(mapper=...)``), read on the session's connection for
it. Each database's table names are read once per call (then
``has_table()`` only for a name not listed, which also finds views and
tables on a schema search path); nothing else is asked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, Table, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.orm import Session, configure_mappers
from sqlalchemy.sql.util import find_tables

from . import _registry
from ._execute import translated
from .errors import CounterCacheError
from .sidetable import table_for

if TYPE_CHECKING:
    from .declaration import CounterCache

__all__ = ["counters_for", "metadatas"]


def metadatas(metadata: Any) -> list[MetaData] | None:
    """``metadata=`` as a list (None when not given)."""
    if metadata is None:
        return None
    if isinstance(metadata, MetaData) or not isinstance(metadata, Iterable) or isinstance(metadata, str):
        found = [metadata]
    else:
        found = list(metadata)
    for md in found:
        if not isinstance(md, MetaData):
            raise CounterCacheError(f"metadata= takes a MetaData or several, not {type(md).__name__}")
    return found


def counters_for(bind: Any, counters: tuple[Any, ...], metadata: Any = None, *,
                 only: Any = None, recount: bool = True) -> list[CounterCache]:
    """The counters to cover on ``bind`` (see the module docstring); ``only(counter)``
    narrows those taken when none is named (``fold()``: those with a side table), and
    then finding none in the database is no error. ``recount=False`` (``fold()``,
    which reads no child row): the parent table decides, wherever the children live."""
    configure_mappers()
    wanted = metadatas(metadata)
    broken = _registry.failed_in(None if wanted is None else [t for md in wanted for t in md.tables.values()]) \
        if not counters and _registry.failed else None
    if broken is not None:  # (a counter refused at mapper configuration is not kept: say so, not "no drift")
        raise _registry.failure(*broken)
    found = [_registry.lookup(c) for c in counters] if counters else [
        c for c in _registry.all_counters() if c.parent is not None]
    for counter in found:
        if counter.parent is None:
            raise CounterCacheError(f"{counter.name}: its mapper is not configured")
    if wanted is not None:
        outside = [c for c in found if not _in(c, wanted)]
        if counters and outside:
            raise CounterCacheError(
                f"{outside[0].name}: its table {outside[0].parent.table.fullname} is not in "  # type: ignore[union-attr]
                "the metadata given (metadata=)")
        found = [c for c in found if c not in outside]
    if not counters and only is not None:
        found = [c for c in found if only(c)]
    if not found:
        if wanted is not None and not counters and only is None:
            raise CounterCacheError("the metadata given (metadata=) holds no counter")
        return []
    tables = _Tables(bind)
    kept = []
    for counter in found:
        if tables.database(counter) is None:
            if not counters:
                continue  # a Session with no bind for it: not one of its databases
            raise CounterCacheError(f"{counter.name}: the session has no bind for {counter.mapper}")
        own, extra = _tables_of(counter, recount)
        missing = tables.missing(counter, own)
        if missing and not counters:
            continue  # another database's counter
        missing += tables.missing(counter, extra)
        if missing:
            raise CounterCacheError(
                f"{counter.name}: no table{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"in the database at {tables.where(counter)}")
        kept.append(counter)
    if not kept and only is None:
        raise CounterCacheError(
            f"no counter has its tables in the database at {tables.where(found[0])} "
            f"({', '.join(c.name for c in found[:5])}{', ...' if len(found) > 5 else ''} do not): "
            "check each database with its own bind, or name the counters")
    return kept


def _in(counter: CounterCache, wanted: list[MetaData]) -> bool:
    table = counter.parent.table  # type: ignore[union-attr]
    return any(md.tables.get(table.key) is table for md in wanted)


def _tables_of(counter: CounterCache, recount: bool = True) -> tuple[list[Table], list[Table]]:
    """``(the parent table and the tables its recount reads, the side table if any)``."""
    parent = counter.parent
    assert parent is not None and counter.kind is not None
    own = [parent.table]
    for table in find_tables(counter.kind.real_count(list(parent.pk_cols))) if recount else ():
        if isinstance(table, Table) and table not in own:
            own.append(table)
    side = table_for(counter)
    extra = [side] if side is not None and side not in own else []
    if not recount:  # (fold(): the parent and side tables are the counter's own)
        return own + extra, []
    return own, extra


class _Tables:
    """Which tables exist, per database the bind reaches (names read once per schema)."""

    def __init__(self, bind: Any) -> None:
        if not isinstance(bind, (Engine, Connection, Session)):
            raise CounterCacheError(
                f"bind must be an Engine, Connection or Session (or a scoped_session), not {type(bind).__name__}")
        self.bind = bind
        #: database (an Engine or Connection) -> (inspector, {schema: names listed}, {(schema, name): exists})
        self._known: dict[Any, tuple[Any, dict[Any, set[str]], dict[tuple[Any, str], bool]]] = {}

    def database(self, counter: CounterCache) -> Any:
        """The Engine or Connection the counter is read on (None: a Session with no bind for it)."""
        if isinstance(self.bind, Session):
            try:
                return self.bind.get_bind(mapper=counter.mapper)
            except UnboundExecutionError:
                return None
        return self.bind

    def where(self, counter: CounterCache) -> str:
        database = self.database(counter)
        if database is None:
            return "no bind of the session"
        return database.engine.url.render_as_string(hide_password=True)

    def missing(self, counter: CounterCache, tables: list[Table]) -> list[str]:
        if not tables:
            return []
        database = self.database(counter)
        where = self._connection(database, counter)
        known = self._known.get(database)
        if known is None:
            known = self._known[database] = (inspect(where), {}, {})
        inspector, listed, exists = known
        missing = []
        for table in tables:
            schema = translated(where, table.schema)  # (where a schema_translate_map puts it)
            key = (schema, table.name)
            found = exists.get(key)
            if found is None:
                names = listed.get(schema)
                if names is None:
                    names = listed[schema] = set(inspector.get_table_names(schema=schema))
                found = exists[key] = table.name in names or inspector.has_table(table.name, schema=schema)
            if not found:
                missing.append(table.fullname)
        return missing

    def _connection(self, database: Any, counter: CounterCache) -> Any:
        if isinstance(self.bind, Session):  # (its transaction: what it flushed is visible)
            return self.bind.connection(bind_arguments={"mapper": counter.mapper})
        return database  # (an Engine's inspector checks a connection out per question)
