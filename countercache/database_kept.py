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

from sqlalchemy.orm.attributes import instance_state

from . import _registry, config, memory
from .kinds import ManyToMany, MultiLevel
from .errors import CounterCacheError
from .strategies import trigger as trigger_strategy
from .strategies.trigger import verify_installed
from .trigger_sql import trigger_name

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session

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


def fed_by(mappers: Any) -> list[CounterCache]:
    """The database-kept counters whose counted rows ``mappers`` write (a many-to-many
    counter's association rows: either side's class; a multi-level counter's middle rows
    too); remembered per set of mappers (a flush asks it twice, and the next flushes
    mostly write the same classes)."""
    kept = counters()
    if not kept:
        return []
    key = tuple(mappers)
    found = _fed.get(key)
    if found is None:
        found = [c for c in kept if any(m.isa(c.child_mapper)  # type: ignore[arg-type]
                                        or (isinstance(c.kind, ManyToMany) and m.isa(c.mapper))  # type: ignore[arg-type]
                                        or (isinstance(c.kind, MultiLevel) and m.isa(c.kind.middle_mapper))
                                        for m in key)]
        if len(_fed) >= FED_MAX:
            _fed.clear()
        _fed[key] = found
    return found


def _written(uow: Any) -> list[Mapper[Any]]:
    return [mapper for mapper, states in uow.mappers.items() if states]


def after_flush(session: Session, uow: Any) -> None:
    """Raise (the flush is rolled back) where a counter's triggers are missing,
    or where a counter configured away from them still has them."""
    if trigger_strategy.leaving:
        written = _written(uow)
        for counter in list(trigger_strategy.leaving):
            if counter.strategy() in config.DATABASE_STRATEGIES or not _registry.live(counter):
                trigger_strategy.leaving.discard(counter)
            elif any(m.isa(counter.child_mapper) for m in written):
                trigger_strategy.verify_gone(
                    session.connection(bind_arguments={"mapper": counter.child_mapper}), counter)
    if not _cache[1] and _cache[0] == config._config.generation:
        return
    kept = uow.countercache_kept = fed_by(_written(uow))
    for counter in kept:
        _verify(session, counter)
    if session.new:
        uow.countercache_new = _new_parents(session)


def _new_parents(session: Session) -> list[tuple[Any, Any]]:
    """``(parent table, instance)`` of the parents of a database-kept counter that the
    flush inserts: the parent table's trigger starts their counter from the rows already
    under their key (a deferred foreign key, children that outlived a former parent)."""
    parents = {counter.mapper.class_: counter.parent for counter in counters()}  # type: ignore[union-attr]
    return [(parent, obj) for obj in session.new for cls, parent in parents.items() if isinstance(obj, cls)]


def _verify(session: Session, counter: CounterCache) -> None:
    """The counter's triggers exist where its rows are written, and its parents are there too."""
    bind = session.bind
    binds = getattr(session, "binds", getattr(session, "_Session__binds", True))  # (its name in SQLAlchemy 2.0 / 2.1)
    if bind is not None and not binds:  # (one bind: the usual case)
        found = trigger_strategy._verified.get(getattr(bind, "engine", bind))
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
    refresh(session, fed_by(_written(uow)) if kept is None else kept)
    inserted: dict[Any, list[tuple[Any, None]]] = {}
    for parent, obj in getattr(uow, "countercache_new", ()):
        key = instance_state(obj).key
        if key is not None:
            inserted.setdefault(parent, []).append((tuple(key[1]), None))
    for parent, results in inserted.items():
        memory.apply(session, parent, results)


def after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    """A rolled-back savepoint (or transaction) took the triggers' writes back:
    the counters read after them are expired (read again on next access)."""
    kept = counters()
    if kept and session.identity_map:
        expire(session, kept)
        if not session.expire_on_commit and previous_transaction.parent is not None:
            # (a savepoint's, where the commit keeps objects: read back at the commit)
            for parent, keys in _loaded(session, kept).items():
                memory.read_back_at_commit(session, parent, keys)


def refresh(session: Session, kept: list[CounterCache]) -> None:
    """The counters ``kept`` of every parent in ``session``: expired, or read back."""
    if not kept or not session.identity_map:
        return
    for parent, keys in _loaded(session, kept).items():
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
    kept = fed_by(list(mapper.self_and_descendants))
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
    keys: dict[type, list[str]] = {}
    for counter in kept:
        keys.setdefault(counter.mapper.class_, []).append(str(counter.key))  # type: ignore[union-attr]
    for obj in list(session.identity_map.values()):
        for cls, names in keys.items():
            if isinstance(obj, cls):
                session.expire(obj, names)
