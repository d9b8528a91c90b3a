"""What the ORM does for a counter the database keeps (``trigger``) (private).

The triggers change the counter in the child row's own statement, so the
ORM counts nothing for it (:func:`countercache.children._child_for` leaves
it out: no pre-read, no lock, no delta). What is left is memory and safety:

* after a flush that wrote rows of its child class, the counter of every
  parent of its class in the session is refreshed (expired, or read back
  where the commit keeps objects: ``expire_on_commit=False``), as the other
  strategies show their new values;
* before that, once per engine, the triggers are checked to exist: a
  counter whose triggers were never created fails the flush (rolled back,
  nothing kept) with a :class:`~countercache.CounterCacheError` naming it,
  instead of drifting;
* an ORM ``update()`` / ``delete()`` / ``insert()`` statement on the child
  class refreshes the loaded parents the same way (a statement that only
  such counters watch is run here, and the parents refreshed after it;
  next to ORM-kept counters, their loaded values are expired before it);
  so does a legacy bulk method (``bulk_save_objects()``...), which the
  database counts: the loaded values are expired before it writes.

Many-to-many counters keep going through their collection tracking, whose
``trigger`` strategy object only notes the parents to refresh
(:class:`countercache.strategies.trigger.TriggerStrategy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from . import _registry, config, memory, transactions
from .kinds import ManyToMany, MultiLevel
from .errors import CounterCacheError
from .strategies import trigger as trigger_strategy
from .strategies.trigger import verify_installed
from .trigger_sql import trigger_name

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, ORMExecuteState

    from .declaration import CounterCache

#: (configuration generation, counters, whether the ORM keeps any, how many times computed)
_cache: list[Any] = [-1, [], True, 0]
#: written mappers -> the counters they feed (:func:`fed_by`), emptied with ``_cache``
_fed: dict[tuple[Any, ...], list[Any]] = {}
FED_MAX = 256


def counters() -> list[CounterCache]:
    """The resolved counters the database keeps under the configuration in force."""
    generation = config._config.generation
    if _cache[0] != generation:
        known = _registry.all_counters()
        _cache[1] = [c for c in known if c.parent is not None and c.strategy() in config.DATABASE_STRATEGIES]
        # (a counter not resolved yet counts as the ORM's: its flush configures the mappers)
        _cache[2] = any(c.parent is None or c.strategy() not in config.DATABASE_STRATEGIES for c in known)
        _cache[0] = generation
        _cache[3] += 1
        _fed.clear()
    return _cache[1]  # type: ignore[no-any-return]


def orm_kept() -> bool:
    """Does the ORM keep any counter (else a flush needs none of its tracking)?"""
    if _cache[0] != config._config.generation:
        counters()
    return _cache[2]  # type: ignore[no-any-return]


def forget() -> None:
    """Ask again (a counter was just resolved, or the listeners removed)."""
    _cache[0] = -1
    _fed.clear()
    _orm_fed.clear()


def fed_by(mappers: Any, deleting: Any = ()) -> list[CounterCache]:
    """The database-kept counters whose counted rows ``mappers`` write (a many-to-many
    counter's association rows: either side's class; a multi-level counter's middle rows
    too), or whose counted rows the database's ``ON DELETE`` actions change when rows of
    ``deleting`` go (a cascade the parent's trigger counts: its loaded value changes too);
    remembered per set of mappers (a flush asks it twice, and the next flushes mostly
    write the same classes)."""
    kept = counters()
    if not kept:
        return []
    key = (tuple(mappers), tuple(deleting))
    found = _fed.get(key)
    if found is None:
        reached = _reached({table for mapper in deleting for table in mapper.tables})
        found = [c for c in kept if any(_feeds(c, m) for m in key[0]) or bool(reached & _counted_tables(c))]
        if len(_fed) >= FED_MAX:
            _fed.clear()
        _fed[key] = found
    return found


def _feeds(counter: CounterCache, mapper: Mapper[Any]) -> bool:
    """Does ``mapper`` write the counter's counted rows (a many-to-many counter's association
    rows: either side's class; a multi-level counter's middle rows too)?"""
    kind = counter.kind
    return (mapper.isa(counter.child_mapper)  # type: ignore[arg-type]
            or (isinstance(kind, ManyToMany) and mapper.isa(counter.mapper))  # type: ignore[arg-type]
            or (isinstance(kind, MultiLevel) and mapper.isa(kind.middle_mapper)))


#: foreign key actions that delete or change rows
_ACTIONS = {"CASCADE", "SET NULL", "SET DEFAULT"}


def _reached(tables: set[Any]) -> set[Any]:
    """The tables whose rows the database's ``ON DELETE`` actions delete or change when
    rows of ``tables`` are deleted, at any depth (up to 8 levels)."""
    seen, level = set(tables), set(tables)
    for _ in range(8):
        below = set()
        for table in {t for origin in level for t in origin.metadata.tables.values()} - seen:
            for fk in table.foreign_keys:
                if (fk.ondelete or "").upper() in _ACTIONS and _referred(fk) in level:
                    below.add(table)
                    break
        if not below:
            break
        seen |= below
        level = below
    return seen - set(tables)


def _referred(fk: Any) -> Any:
    try:
        return fk.column.table
    except Exception:  # noqa: BLE001 - a table outside the metadata: no action of ours reaches it
        return None


def _counted_tables(counter: CounterCache) -> set[Any]:
    kind = counter.kind
    if isinstance(kind, ManyToMany):
        return {kind.secondary}
    tables = set(counter.child_mapper.tables)  # type: ignore[union-attr]
    if isinstance(kind, MultiLevel):
        tables |= set(kind.middle_mapper.tables)
    return tables


def _written(uow: Any) -> list[Mapper[Any]]:
    return [mapper for mapper, states in uow.mappers.items() if states]


def _deleting(uow: Any) -> list[Mapper[Any]]:
    return [mapper for mapper, states in uow.mappers.items() if any(uow.states[st][0] for st in states)]


def after_flush(session: Session, uow: Any) -> None:
    """Raise (the flush is rolled back) where a counter's triggers are missing,
    or where a counter configured away from them still has them."""
    written = _written(uow)
    if written:
        check_leftovers(session, written)
    if not _cache[1] and _cache[0] == config._config.generation:
        return
    kept = uow.countercache_kept = fed_by(written, _deleting(uow))
    for counter in kept:
        _verify(session, counter)
    if session.new:
        uow.countercache_new = _new_parents(session)


#: databases whose trigger catalog :func:`countercache.triggers.installed_bases` reads
_CATALOGS = ("postgresql", "sqlite", "mysql", "mariadb")


def check_leftovers(session: Session, written: list[Mapper[Any]], clause: Any = None) -> None:
    """The ORM-kept counters whose rows this flush (or an ORM statement) writes: countercache triggers of theirs
    still in the database (a counter switched away from ``trigger`` whose migration did
    not drop them, or has not run) would count every row a second time: raise, naming
    the counter (the flush is rolled back). Asked once per engine and counter (a catalog
    query, at its first flush there); a session whose connections all come from its one
    bind skips even the lookups once its classes were checked there."""
    key = (config._config.generation, frozenset(written))
    fed = _orm_fed.get(key)
    if fed is None:
        fed = [c for c in _registry.all_counters() if c.parent is not None and _registry.live(c)
               and c.strategy() not in config.DATABASE_STRATEGIES and any(_feeds(c, m) for m in written)]
        if len(_orm_fed) >= FED_MAX:
            _orm_fed.clear()
        _orm_fed[key] = fed
    if not fed:
        return
    engine = _one_engine(session)
    if engine is not None and key in trigger_strategy.clean.get(engine, ()):
        return
    for counter in fed:  # (a statement's clause: the connection its own get_bind gives it)
        connection = session.connection(bind_arguments={"mapper": counter.child_mapper, "clause": clause})
        if connection.dialect.name in _CATALOGS:
            trigger_strategy.verify_gone(connection, counter)
    if engine is not None:
        known = trigger_strategy.clean.setdefault(engine, set())
        if len(known) >= FED_MAX:
            known.clear()
        known.add(key)


#: (configuration generation, written mappers) -> the ORM-kept counters they feed
_orm_fed: dict[tuple[Any, ...], list[Any]] = {}


def _new_parents(session: Session) -> list[tuple[Any, Any]]:
    """``(parent table, instance)`` of the parents of a database-kept counter that the
    flush inserts: the parent table's trigger starts their counter from the rows already
    under their key (a deferred foreign key, children that outlived a former parent)."""
    parents = {counter.mapper.class_: counter.parent for counter in counters()}  # type: ignore[union-attr]
    return [(parent, obj) for obj in session.new for cls, parent in parents.items() if isinstance(obj, cls)]


def _one_engine(session: Session) -> Any:
    """The engine every connection of ``session`` comes from (one bind, no ``binds=``, the
    default ``get_bind``), else None (a connection may come from another engine)."""
    bind = session.bind
    binds = getattr(session, "binds", getattr(session, "_Session__binds", True))  # (its name in SQLAlchemy 2.0 / 2.1)
    if bind is None or binds or type(session).get_bind is not Session.get_bind:
        return None
    return getattr(bind, "engine", bind)


def _verify(session: Session, counter: CounterCache) -> None:
    """The counter's triggers exist where its rows are written, and its parents are there too."""
    engine = _one_engine(session)
    if engine is not None:  # (one bind: the usual case)
        found = trigger_strategy._verified.get(engine)
        if found is not None and trigger_name(counter) in found:
            return
    child_bind = session.get_bind(mapper=counter.child_mapper)
    parent_bind = session.get_bind(mapper=counter.mapper)
    if getattr(child_bind, "engine", child_bind) is not getattr(parent_bind, "engine", parent_bind):
        raise CounterCacheError(
            f"{counter.name}: the session writes {counter.mapper.class_.__name__} and "  # type: ignore[union-attr]
            f"{counter.child_mapper.class_.__name__} on different binds, and a trigger keeps a counter "  # type: ignore[union-attr]
            "within one database; use strategy 'bulk'")
    verify_installed(session.connection(bind_arguments={"mapper": counter.child_mapper}), counter)


def after_flush_postexec(session: Session, uow: Any) -> None:
    """Refresh the counters of loaded parents of the child classes this flush wrote."""
    if not _cache[1] and _cache[0] == config._config.generation:
        return
    kept = getattr(uow, "countercache_kept", None)
    refresh(session, fed_by(_written(uow), _deleting(uow)) if kept is None else kept)
    inserted: dict[Any, list[tuple[Any, None]]] = {}
    for parent, obj in getattr(uow, "countercache_new", ()):
        key = instance_state(obj).key
        if key is not None:
            inserted.setdefault(parent, []).append((tuple(key[1]), None))
    for parent, results in inserted.items():
        memory.apply(session, parent, results)


def refresh(session: Session, kept: list[CounterCache]) -> None:
    """The counters ``kept`` of every parent in ``session``: expired, or read back."""
    if not kept or not session.identity_map:
        return
    for parent, keys in _loaded(session, kept).items():
        transactions.remember_refreshed(session, parent, keys)  # (a savepoint's rollback shows the values before)
        memory.apply(session, parent, [(key, None) for key in keys])


def _loaded(session: Session, kept: list[CounterCache]) -> dict[Any, list[tuple[Any, ...]]]:
    """parent table -> the keys of its objects in ``session`` (those with some)."""
    by_parent: dict[Any, list[tuple[Any, ...]]] = {}
    for counter in kept:
        parent = counter.parent
        cls = counter.mapper.class_  # type: ignore[union-attr]
        if parent in by_parent:
            continue
        by_parent[parent] = [tuple(state.key[1]) for state in session.identity_map.all_states()
                             if state.key is not None and isinstance(state.obj(), cls)]
    return {parent: keys for parent, keys in by_parent.items() if keys}


def before_statement(state: ORMExecuteState, mapper: Mapper[Any], alone: bool) -> Any:
    """An ORM DML statement on ``mapper``: None where no database-kept counter
    watches its rows. ``alone`` (no ORM-kept counter does either): run it here
    and refresh the loaded parents after it, returning its result; else expire
    their counters now (read on next access) and return None."""
    kept = fed_by(list(mapper.self_and_descendants), list(mapper.self_and_descendants) if state.is_delete else ())
    if not kept:
        return None
    session = state.session
    for counter in kept:
        _verify(session, counter)
    if state.is_update and session.get_bind(mapper=mapper).dialect.name in ("mysql", "mariadb") \
            and any("IGNORE" in str(prefix).upper() for prefix, _ in getattr(state.statement, "_prefixes", ())):
        raise CounterCacheError(
            f"{kept[0].name}: UPDATE IGNORE fires MariaDB/MySQL's AFTER UPDATE triggers for the rows it "
            "skips too, so the database would count moves that did not happen; drop IGNORE, or use "
            "strategy 'bulk'")
    if alone:
        result = state.invoke_statement()
        refresh(session, kept)
        return result
    expire(session, kept)
    return None


def expire(session: Session, kept: list[CounterCache]) -> None:
    """Expire the counters ``kept`` of every loaded parent (read again on next access, after
    the statement about to run: an ORM statement next to ORM-kept counters, a legacy bulk call;
    or after a rollback took the triggers' writes back)."""
    for parent, loaded in _loaded(session, kept).items():
        transactions.remember_refreshed(session, parent, loaded)  # (a savepoint's rollback shows the values before)
    keys: dict[type, list[str]] = {}
    for counter in kept:
        keys.setdefault(counter.mapper.class_, []).append(str(counter.key))  # type: ignore[union-attr]
    for obj in list(session.identity_map.values()):
        for cls, names in keys.items():
            if isinstance(obj, cls):
                session.expire(obj, names)
