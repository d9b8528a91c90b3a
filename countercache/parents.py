"""Hooks on the parent mappers (private): a new parent starts at 0, a deleted
one loses its shard rows and what the transaction held for it, a re-keyed
one takes its deltas and shard rows along."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import set_committed_value

from . import config, shard_writes, transactions
from .errors import CounterCacheError
from .flush import _flushes
from .kinds import held_by_foreign_key
from .values import canonical_key, key_converters
from .strategies import STRATEGY_CLASSES
from .writer import ParentTable

__all__ = ["parent_inserting", "parent_inserted", "parent_deleted", "parent_updated"]

#: Strategies that write the parent row and assume a new one has no children yet.
_STARTS_AT_ZERO = ("bulk", "per_row", "deferred")


def waiting(mapper: Any) -> list[tuple[ParentTable, list[Any]]]:
    """The parent tables of ``mapper`` with counters whose new rows start from the rows
    already under their key (``bulk``, ``per_row``, ``deferred``, no foreign key);
    asked at every parent insert: kept per parent table and configuration."""
    found = []
    generation = config._config.generation
    for parent in ParentTable.of_mapper(mapper):
        cached = parent.__dict__.get("_waiting")
        if cached is None or cached[0] != generation:
            cached = parent.__dict__["_waiting"] = (generation, [
                c for c in parent.counters if c.strategy() in _STARTS_AT_ZERO and not held_by_foreign_key(c)])
        if cached[1]:
            found.append((parent, cached[1]))
    return found


def forget_counted(session: Any, parent: ParentTable, counters: list[Any], key: Any) -> None:
    """A new parent was recounted: what this flush and the transaction hold for its key
    (rows flushed before it) is in the count already, and must not be added again."""
    slots = {i for i, c in enumerate(parent.counters) if c in counters}
    transactions.take_back(session, "deferred", parent, key, slots=slots)
    fs = _flushes.get(session.hash_key)
    for strategy in (fs.strategies.values() if fs is not None else ()):
        _drop_pending(fs, strategy, parent, key, slots)


def _drop_pending(fs: Any, strategy: Any, parent: ParentTable, key: Any, slots: Any = None) -> None:
    """Drop the flush's own deltas for a parent key, not held yet (``slots``: those counters'
    only). Keys are made canonical once while no delta is added: a flush deleting many
    parents does not canonicalize per parent."""
    pending = strategy.pending.get(parent)
    if not pending:
        return
    if fs.canonical.get(id(pending)) != len(pending):
        pending = strategy.pending[parent] = parent.canonical(pending)
    if slots is None:
        pending.pop(key, None)
    elif key in pending:
        pending[key] = [0 if i in slots else d for i, d in enumerate(pending[key])]
    fs.canonical[id(pending)] = len(pending)


def recount(connection: Connection, parent: ParentTable, counters: list[Any], key: Any) -> tuple[Any, Any]:
    """Set ``counters`` of the new parent row ``key`` to the rows under its key now:
    ``(the key as stored, their values)``."""
    converters = key_converters(parent.pk_cols)
    if converters is not None:  # (a key given as another type: "1" for an integer key, as stored)
        key = canonical_key(converters, tuple(key))
    where = and_(*(col == bindparam(None, value, type_=col.type) for col, value in zip(parent.pk_cols, key)))
    recounts = {c.column.name: c.kind.real_count(list(parent.pk_cols)).scalar_subquery() for c in counters}
    connection.execute(update(parent.table).where(where).values(recounts))
    return key, connection.execute(select(*(parent.table.c[name] for name in recounts)).where(where)).one()


def parent_inserted(mapper: Any, connection: Connection, state: Any) -> None:
    """Parent mapper ``after_insert``: where no foreign key keeps the counted rows'
    parents, rows already under the new key are counted now (``bulk``, ``per_row``,
    ``deferred``: their writes to a parent that was not there changed nothing), before
    the flush's own rows of it are inserted (counted as usual, after). An ORM INSERT
    statement: :func:`countercache.bulk_dml` calls :func:`recount`. Not inside
    ``suspended()`` (nothing is counted there; ``reconcile()`` repairs)."""
    if _flushes.get(state.session_id) is None:
        return
    for parent, counters in waiting(mapper):
        key, row = recount(connection, parent, counters, mapper.primary_key_from_instance(state.obj()))
        forget_counted(state.session, parent, counters, key)
        for counter, value in zip(counters, row):
            set_committed_value(state.obj(), counter.key, value)


def parent_inserting(mapper: Any, connection: Connection, state: Any) -> None:
    """Parent mapper ``before_insert``: a new row has no children yet, whatever
    value its object carries (a loaded object made transient and added again
    as a copy keeps the original's counts): its counters are inserted as 0;
    children added in the same flush are counted after the INSERT."""
    values = state.dict
    fs = _flushes.get(state.session_id)
    for parent in ParentTable.of_mapper(mapper):
        for counter in parent.counters:
            key = counter.key
            if values.get(key, 0) != 0:
                set_committed_value(state.obj(), key, 0)
        if fs is not None and parent in fs.uninserted:  # (its INSERT runs before any later row's hooks)
            fs.uninserted[parent].discard(tuple(mapper.primary_key_from_instance(state.obj())))


def parent_deleted(mapper: Any, connection: Connection, state: Any) -> None:
    """Parent mapper ``after_delete``: a parent with sharded counters is gone;
    what ``deferred``/``sharded`` hold for it is taken back (a row inserted
    later with the same key starts at 0, and must get only its own children)."""
    fs = _flushes.get(state.session_id)
    if fs is None:
        return
    session = fs.session
    key = tuple(state.key[1])
    for parent in ParentTable.of_mapper(mapper):
        held = {STRATEGY_CLASSES[c.strategy()].held for c in parent.counters} - {None}
        if "sharded" in held:
            transactions.parent_deleted(session, parent, key)
        for attribute in held:
            strategy = fs.strategies.get(attribute)
            if strategy is not None:  # (the flush's own deltas for the row: gone with it)
                _drop_pending(fs, strategy, parent, key)
            transactions.take_back(session, attribute, parent, key)  # type: ignore[arg-type]


def parent_updated(mapper: Any, connection: Connection, state: Any) -> None:
    """Parent mapper ``after_update``: a changed primary key. The row keeps its
    counters; what is addressed to the old key goes to the new one: the
    flush's deltas (children that SQLAlchemy re-points, ``passive_updates=
    False``, move from the old key to the new one: nothing to add), those
    ``deferred``/``sharded`` hold, and ``sharded``'s shard rows (children a
    database ``ON UPDATE CASCADE`` re-points are not seen at all)."""
    fs = _flushes.get(state.session_id)
    if fs is None or state.key is None:
        return
    old = tuple(state.key[1])
    new = tuple(mapper.primary_key_from_instance(state.obj()))
    if new == old or None in new:
        return
    if fs.uow is not None and any(  # (the flush's deltas for the old key would not tell the two apart)
            st.key is None and not isdelete and st.mapper.isa(mapper.base_mapper)
            and tuple(st.mapper.primary_key_from_instance(st.obj())) == old
            for st, (isdelete, _) in fs.uow.states.items()):
        raise CounterCacheError(
            f"{mapper.class_.__name__}: a row gives up the key {old!r} and a new row takes it in the same flush; "
            "its counters cannot tell the two apart: flush between the two changes")
    for parent in ParentTable.of_mapper(mapper):
        fs.renamed.setdefault(parent, {})[old] = new
        held = {STRATEGY_CLASSES[c.strategy()].held for c in parent.counters} - {None}
        for attribute in held:
            transactions.rekey(fs.session, attribute, parent, old, new)  # type: ignore[arg-type]
        if "sharded" in held:
            if transactions.reuse_deleted(fs.session, parent, new):  # (a parent deleted earlier had that key)
                shard_writes.forget(connection, parent, {new})
            shard_writes.rekey(connection, parent, old, new)
