"""Many-to-many counters: rows of the association table (private).

``Tag.post_count = counter_cache("posts")`` over ``secondary=post_tags``
counts a tag's rows in ``post_tags``. The flush writes those rows itself
(there are no mapper events for them), from the collection history of both
sides; so this module reads, in ``after_flush`` and only for the objects the
flush handled, the very histories the flush acted on (the unit of work's
cache), and turns them into per-tag deltas:

* a post added to ``tag.posts`` or a tag added to ``post.tags`` (or to any
  other relationship writing that table, tied by ``back_populates`` or not;
  a ``viewonly`` one writes nothing and counts nothing): +1;
* removed from either collection: -1;
* a post deleted: -1 for every tag it was linked to (the flush deletes
  those rows), a tag deleted: nothing (a deleted parent needs no update).

A link seen from both sides (a ``back_populates`` pair) counts once. The
deltas then go through the counter's strategy like any other.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect, select, tuple_
from sqlalchemy.orm import Mapper

from . import _registry
from .config import DATABASE_STRATEGIES
from ._compat import PASSIVE_NO_INITIALIZE
from .locking import actions_run, for_update

if TYPE_CHECKING:
    from .declaration import CounterCache
    from .flush import FlushState

#: The many-to-many counters to count.
_counters: list[CounterCache] = []
#: mapper -> [(counter, "parent" | "child", relationship key)]: which relationships
#: of a class write association rows of which counter, from which side (built
#: at the first flush after a counter is added, when every mapper is configured)
_sides: weakref.WeakKeyDictionary[Mapper[Any], list[tuple[CounterCache, str, str]]] = weakref.WeakKeyDictionary()
_built = False


def track(counter: CounterCache) -> None:
    """Count ``counter``'s association rows in the flushes of both its classes."""
    global _built
    if counter not in _counters:
        _prune()
        _counters.append(counter)
        _built = False


def _prune() -> None:
    """Forget counters whose mappers were disposed (``clear_mappers()``): a
    table mapped again must not feed them too."""
    _counters[:] = [c for c in _counters if _registry.live(c)]


def clear() -> None:
    global _built
    _counters.clear()
    _sides.clear()
    _built = False


def _build() -> None:
    """Every relationship that writes a counter's association rows: the
    counted one unless ``viewonly``, its ``back_populates`` partner, and any
    other over the same table (one-sided, or not tied to the counted one),
    on the side whose columns name the parent."""
    global _built
    _sides.clear()
    _prune()
    for counter in _counters:
        kind = counter.kind
        parent_cols = set(kind.parent_cols)
        mappers = {m for reg in {counter.mapper.registry, counter.child_mapper.registry}  # type: ignore[union-attr]
                   for m in reg.mappers}
        for mapper in mappers:
            for rel in mapper.relationships:
                if rel.secondary is not kind.secondary or rel.viewonly or rel.parent is not mapper:
                    continue
                if {dest for _, dest in rel.synchronize_pairs} == parent_cols:
                    side = "parent"
                elif {dest for _, dest in rel.secondary_synchronize_pairs or ()} == parent_cols:
                    side = "child"
                else:
                    continue
                entries = _sides.setdefault(mapper, [])
                if (counter, side, rel.key) not in entries:
                    entries.append((counter, side, rel.key))
    _built = True


def _sides_of(mapper: Mapper[Any]) -> list[tuple[CounterCache, str, str]]:
    found: list[tuple[CounterCache, str, str]] = []
    for m in mapper.iterate_to_root():
        found.extend(_sides.get(m, ()))
    return found


def _pk(state: Any) -> tuple[Any, ...] | None:
    if state.key is not None:
        return tuple(state.key[1])
    key = state.mapper.primary_key_from_instance(state.obj())
    return None if None in key else tuple(key)


def replaced(session: Any) -> set[Any]:
    """Identity keys of the objects given to ``session.delete()`` that a new
    object with the same key takes over in this flush: SQLAlchemy UPDATEs
    their rows (a row switch), so no ``ON DELETE CASCADE`` runs for them."""
    new_keys = set()
    for obj in session.new:
        state = inspect(obj)
        key = state.mapper.identity_key_from_instance(obj)
        if None not in key[1]:
            new_keys.add(key)
    return {inspect(obj).key for obj in session.deleted if inspect(obj).key in new_keys} if new_keys else set()


def read_cascaded(fs: FlushState) -> None:
    """``before_flush``: the links of deleted objects that the database, not the
    flush, will remove (``passive_deletes=True`` on a relationship writing the
    association table, its collection not loaded: ``ON DELETE CASCADE``),
    read (and locked) now, while they exist; :func:`collect` counts them."""
    if not _counters or not fs.session.deleted:
        return
    if not _built:
        _build()
    switched = replaced(fs.session)
    for obj in list(fs.session.deleted):
        state = inspect(obj)
        if state.key in switched:
            continue  # (its row stays, and its links)
        for counter, side, key in _sides_of(state.mapper):
            rel = state.mapper.get_property(key)
            if side != "child" or not rel.passive_deletes or key in state.dict or state.key is None \
                    or counter.strategy() in DATABASE_STRATEGIES:
                continue
            parent_cols = list(counter.kind.parent_cols)
            criteria = [dest == getattr(obj, state.mapper.get_property_by_column(src).key)
                        for src, dest in rel.synchronize_pairs]
            connection = fs.session.connection(bind_arguments={"mapper": state.mapper})  # (no flush transaction yet)
            stmt = select(*parent_cols).where(*criteria, actions_run(connection)).order_by(*parent_cols)
            stmt = for_update(stmt, connection)
            me = tuple(state.key[1])
            for row in connection.execute(stmt).all():
                fs.cascaded.setdefault(counter, set()).add((tuple(row), me))


def collect(fs: FlushState) -> None:
    """Add the deltas of the association rows this flush wrote (``after_flush``)."""
    if not _counters or fs.uow is None:
        return
    if not _built:
        _build()
    uow = fs.uow
    links: dict[CounterCache, tuple[set[tuple[Any, Any]], set[tuple[Any, Any]]]] = {}
    for state, (isdelete, listonly) in list(uow.states.items()):
        sides = _sides_of(state.mapper)
        if not sides:
            continue
        for counter, side, key in sides:
            if counter.strategy() in DATABASE_STRATEGIES:
                continue  # (its triggers count the links)
            if side == "parent" and isdelete and not listonly:
                continue  # a deleted parent needs no update (but one whose row a new object
                # with its key took over, SQLAlchemy's row switch, flagged listonly: its links went)
            history = uow.get_attribute_history(state, key, PASSIVE_NO_INITIALIZE)
            if not history:
                continue
            added, removed = links.setdefault(counter, (set(), set()))
            me = _pk(state)
            gone = list(history.unchanged or ()) + list(history.deleted or ()) if isdelete else list(history.deleted or ())
            new = [] if isdelete else list(history.added or ())
            for other, target in ((o, removed) for o in gone):
                pair = _pair(side, me, other)
                if pair is not None:
                    target.add(pair)
            for other in new:
                pair = _pair(side, me, other)
                if pair is not None:
                    added.add(pair)
    for counter, pairs in fs.cascaded.items():
        links.setdefault(counter, (set(), set()))[1].update(pairs)
    for counter, (added, removed) in links.items():
        strategy = fs.strategy(counter.strategy())
        for parent_key, _ in added - removed:
            strategy.add(counter, parent_key, 1)
        for parent_key, _ in removed - added:
            strategy.add(counter, parent_key, -1)


def _pair(side: str, me: tuple[Any, ...] | None, other: Any) -> tuple[Any, Any] | None:
    """``(parent key, child key)`` of a link seen from ``me``'s side."""
    if other is None:
        return None
    other_key = _pk(inspect(other))
    if me is None or other_key is None:
        return None
    return (me, other_key) if side == "parent" else (other_key, me)


def cascaded_links(mapper: Mapper[Any]) -> list[tuple[CounterCache, list[Any]]]:
    """``(counter, association columns referring to mapper's key)`` where the
    database deletes a counter's links with ``mapper``'s rows (``ON DELETE
    CASCADE`` on the child side of the association table)."""
    found = []
    pk = list(mapper.primary_key)
    for counter in _counters:
        kind = counter.kind
        if kind is None or not _registry.live(counter) or counter.strategy() in DATABASE_STRATEGIES:
            continue  # (a database-kept counter's triggers count what the cascade removes)
        refs = {fk.column: fk.parent for fk in kind.secondary.foreign_keys
                if fk.parent not in kind.parent_cols and fk.ondelete and fk.ondelete.upper() == "CASCADE"}
        if all(col in refs for col in pk):
            found.append((counter, [refs[col] for col in pk]))
    return found


def count_cascaded_links(fs: FlushState, mapper: Mapper[Any], keys: list[tuple[Any, ...]]) -> None:
    """Read (and lock) the links the database deletes with ``mapper``'s rows
    ``keys``; counted by :func:`collect` in a flush, at once otherwise."""
    for counter, columns in cascaded_links(mapper):
        parent_cols = list(counter.kind.parent_cols)
        connection = fs.session.connection(bind_arguments={"mapper": mapper})
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            where = columns[0].in_([k[0] for k in chunk]) if len(columns) == 1 else \
                tuple_(*columns).in_(chunk)
            stmt = select(*parent_cols, *columns).where(where, actions_run(connection))
            stmt = for_update(stmt, connection)
            n = len(parent_cols)
            for row in connection.execute(stmt).all():
                pair = (tuple(row[:n]), tuple(row[n:]))
                if fs.uow is not None:
                    fs.cascaded.setdefault(counter, set()).add(pair)
                else:
                    fs.strategy(counter.strategy()).add(counter, pair[0], -1)
