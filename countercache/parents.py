"""Hooks on the parent mappers: a new parent starts at 0, a deleted one loses its shard rows (private)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import set_committed_value

from . import transactions
from .flush import _flushes, flushing_session
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
    """Parent mapper ``after_delete``: a parent with sharded counters is gone."""
    session = flushing_session(state)
    if session is None:
        return
    for parent in ParentTable.of_mapper(mapper):
        if any(STRATEGY_CLASSES[c.strategy()].uses_shard_table for c in parent.counters):
            transactions.parent_deleted(session, parent, tuple(state.key[1]))
