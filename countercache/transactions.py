"""Transactions and savepoints: what a rollback must take back, and the commit hook (private).

Each session keeps a stack with one entry per open transaction boundary
(the root transaction and each ``begin_nested()`` savepoint) that has
something to remember:

* ``deferred`` / ``sharded``: deltas of those strategies, summed over the
  flushes made inside that boundary, written once right before the
  outermost COMMIT (to the parent rows, or to the shard rows);
* ``refreshed``: parents whose in-memory counter the library set inside a
  savepoint. SQLAlchemy expires only dirty objects when a savepoint rolls
  back, so the library expires these itself.

A savepoint that is released hands its entry to the enclosing boundary; one
that rolls back drops it (expiring what it refreshed). The root's rollback
drops everything (SQLAlchemy expires every object itself then).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, SessionTransaction

from . import memory, shard_writes
from ._compat import calling_frame

if TYPE_CHECKING:
    from .writer import Deltas, ParentTable


class _Entry:
    __slots__ = ("transaction", "deferred", "sharded", "refreshed", "deleted")

    def __init__(self, transaction: SessionTransaction) -> None:
        self.transaction = transaction
        self.deferred: dict[ParentTable, Deltas] = {}
        self.sharded: dict[ParentTable, Deltas] = {}
        self.refreshed: list[tuple[ParentTable, list[tuple[Any, ...]]]] = []
        #: parents with sharded counters deleted inside this boundary
        self.deleted: dict[ParentTable, set[tuple[Any, ...]]] = {}

    def holds(self) -> bool:
        return bool(self.deferred or self.sharded or self.deleted)

    def absorb(self, other: _Entry) -> None:
        for parent, deltas in other.deferred.items():
            add_deltas(self.deferred, parent, deltas)
        for parent, deltas in other.sharded.items():
            add_deltas(self.sharded, parent, deltas)
        for parent, keys in other.deleted.items():
            self.deleted.setdefault(parent, set()).update(keys)
        self.refreshed.extend(other.refreshed)


class _SessionState:
    __slots__ = ("stack", "committing")

    def __init__(self) -> None:
        self.stack: list[_Entry] = []
        #: True from the outermost before_commit until the transaction ends:
        #: a flush made by another before_commit hook is written at once.
        self.committing = False


_states: weakref.WeakKeyDictionary[Session, _SessionState] = weakref.WeakKeyDictionary()


def add_deltas(into: dict[ParentTable, Deltas], parent: ParentTable, deltas: Deltas) -> None:
    target = into.get(parent)
    if target is None:
        into[parent] = {k: list(v) for k, v in deltas.items()}
        return
    for key, vector in deltas.items():
        mine = target.get(key)
        if mine is None:
            target[key] = list(vector)
        else:
            for i, d in enumerate(vector):
                mine[i] += d


def _boundary(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def current_entry(session: Session) -> _Entry:
    """The entry of the innermost open boundary (created on demand)."""
    state = _states.get(session)
    if state is None:
        state = _states[session] = _SessionState()
    boundary = _boundary(session)
    if not state.stack or state.stack[-1].transaction is not boundary:
        state.stack.append(_Entry(boundary))  # type: ignore[arg-type]
    return state.stack[-1]


def is_committing(session: Session) -> bool:
    state = _states.get(session)
    return state is not None and state.committing


def remember_refreshed(session: Session, parent: ParentTable, keys: list[tuple[Any, ...]]) -> None:
    """Inside a savepoint, note parents whose counters were set in memory."""
    if keys and session.in_nested_transaction():
        current_entry(session).refreshed.append((parent, keys))


# -- session hooks ------------------------------------------------------------


def _committing_transaction() -> SessionTransaction | None:
    """The transaction whose ``_prepare_impl`` fired this ``before_commit``.

    ``before_commit`` fires for a savepoint's release and for the outermost
    commit alike and does not say which; the frame that fired it does.
    """
    frame = calling_frame("_prepare_impl", 2, 6)
    found = frame.f_locals.get("self") if frame is not None else None
    return found if isinstance(found, SessionTransaction) else None


def _before_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint's release, or the commit of all
        transaction = _committing_transaction()
        if transaction is None or transaction.parent is not None:
            return  # a savepoint release: its entry moves up when it ends
    # (no savepoint open: only the outermost transaction fires before_commit)
    state = _states.get(session)
    if state is None or not holds_any(session):
        # nothing deferred so far; a flush made now (the commit's final one)
        # still lands in the stack and is written by after_flush below
        if state is None:
            state = _states[session] = _SessionState()
        state.committing = True
        return
    # The final flush first, so that its deltas join the rest.
    session.flush()
    state.committing = True
    write_deferred(session)


def write_deferred(session: Session) -> None:
    """Write every deferred delta of the transaction now (outermost commit)."""
    state = _states.get(session)
    if state is None:
        return
    merged: dict[ParentTable, Deltas] = {}
    for entry in state.stack:
        for parent, deltas in entry.deferred.items():
            add_deltas(merged, parent, deltas)
        entry.deferred = {}
    for parent in sorted(merged, key=lambda p: p.table.fullname):
        connection = session.connection(bind_arguments={"mapper": parent.mapper})
        results = parent.apply(connection, merged[parent])
        if results:
            memory.apply(session, parent, results)
    write_shards(session)  # after the parent rows, as fold() locks them


def write_shards(session: Session) -> None:
    """Write the sharded deltas of the transaction now, and forget deleted parents' rows."""
    state = _states.get(session)
    if state is None:
        return
    sharded: dict[ParentTable, Deltas] = {}
    deleted: dict[ParentTable, set[tuple[Any, ...]]] = {}
    for entry in state.stack:
        for parent, deltas in entry.sharded.items():
            add_deltas(sharded, parent, deltas)
        for parent, keys in entry.deleted.items():
            deleted.setdefault(parent, set()).update(keys)
        entry.sharded = {}
        entry.deleted = {}
    if sharded or deleted:
        shard_writes.write(lambda parent: session.connection(bind_arguments={"mapper": parent.mapper}),
                     sharded, deleted)


def parent_deleted(session: Session, parent: ParentTable, key: tuple[Any, ...]) -> None:
    """A parent with sharded counters was deleted: its shard rows go at commit."""
    current_entry(session).deleted.setdefault(parent, set()).add(key)


def holds_any(session: Session) -> bool:
    """Does this session's transaction hold deferred or sharded deltas for its commit?"""
    state = _states.get(session)
    return state is not None and any(e.holds() for e in state.stack)


def held_delta(session: Session, parent: ParentTable, key: tuple[Any, ...], slot: int) -> Any:
    """What this session's transaction will add to one parent's counter at commit."""
    state = _states.get(session)
    total = 0
    for entry in state.stack if state is not None else ():
        for held in (entry.deferred, entry.sharded):
            vector = held.get(parent, {}).get(key)
            if vector is not None:
                total += vector[slot]
    return total


def _after_rollback(session: Session) -> None:
    state = _states.get(session)
    if state is None:
        return
    boundary = _boundary(session)
    if boundary is None or boundary.parent is None:
        _states.pop(session, None)  # SQLAlchemy expires every object itself
        return
    kept = []
    for entry in state.stack:
        if _within(entry.transaction, boundary):
            for parent, keys in entry.refreshed:
                memory.expire(session, parent, keys)
        else:
            kept.append(entry)
    state.stack[:] = kept


def _within(transaction: SessionTransaction | None, boundary: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is boundary:
            return True
        transaction = transaction.parent
    return False


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    state = _states.get(session)
    if state is None:
        return
    if transaction.parent is None:
        _states.pop(session, None)
        return
    if state.stack and state.stack[-1].transaction is transaction:
        ended = state.stack.pop()
        if ended.holds() or ended.refreshed:
            # released savepoint: the enclosing boundary takes it over
            enclosing = transaction.parent
            while enclosing is not None and not (enclosing.nested or enclosing.parent is None):
                enclosing = enclosing.parent
            if state.stack and state.stack[-1].transaction is enclosing:
                state.stack[-1].absorb(ended)
            else:
                entry = _Entry(enclosing)  # type: ignore[arg-type]
                entry.absorb(ended)
                state.stack.append(entry)


SESSION_HOOKS = (
    ("before_commit", _before_commit),
    ("after_rollback", _after_rollback),
    ("after_transaction_end", _after_transaction_end),
)
