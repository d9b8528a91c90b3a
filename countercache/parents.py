"""Hooks on the parent mappers: a new parent starts at 0, a deleted one loses its shard rows (private)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import set_committed_value

from . import transactions
from .flush import _flushes
from .strategies import STRATEGY_CLASSES
from .writer import ParentTable

__all__ = ["parent_inserting", "parent_deleted"]


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
            if strategy is not None:  # the flush's own deltas for the row, not held yet: gone with it
                _drop_pending(strategy.pending.get(parent), parent, key)
            transactions.take_back(session, attribute, parent, key)  # type: ignore[arg-type]


def _drop_pending(deltas: Any, parent: ParentTable, key: tuple[Any, ...]) -> None:
    """Forget the deltas for the parent ``key`` in ``deltas`` (keys as given: ``"3"`` for 3 too)."""
    for given in [k for k in deltas or () if k == key or parent.canonical({k: []}).keys() == {key}]:
        del deltas[given]
