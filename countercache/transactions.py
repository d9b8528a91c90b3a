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

import sys
from types import FrameType
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, SessionTransaction

from . import memory

if TYPE_CHECKING:
    from .writer import Deltas, ParentTable


class _Entry:
    __slots__ = ("transaction", "deferred", "sharded", "refreshed", "deleted", "leaves")

    def __init__(self, transaction: SessionTransaction) -> None:
        self.transaction = transaction
        self.deferred: dict[ParentTable, Deltas] = {}
        self.sharded: dict[ParentTable, Deltas] = {}
        self.refreshed: list[tuple[ParentTable, list[tuple[Any, ...]]]] = []
        #: parents with sharded counters deleted inside this boundary
        self.deleted: dict[ParentTable, set[tuple[Any, ...]]] = {}
        #: multi-level leaf deltas of deferred / sharded counters, per middle
        #: row, translated at the commit: strategy name -> counter -> {middle key: delta}
        self.leaves: dict[str, dict[Any, dict[tuple[Any, ...], Any]]] = {}

    def holds(self) -> bool:
        return bool(self.deferred or self.sharded or self.deleted or self.leaves)

    def absorb(self, other: _Entry) -> None:
        for parent, deltas in other.deferred.items():
            add_deltas(self.deferred, parent, deltas)
        for parent, deltas in other.sharded.items():
            add_deltas(self.sharded, parent, deltas)
        for parent, keys in other.deleted.items():
            self.deleted.setdefault(parent, set()).update(keys)
        for name, by_counter in other.leaves.items():
            _add_leaves(self.leaves.setdefault(name, {}), by_counter)
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


def _add_leaves(into: dict[Any, dict[tuple[Any, ...], Any]], by_counter: dict[Any, dict[tuple[Any, ...], Any]]) -> None:
    for counter, by_key in by_counter.items():
        mine = into.setdefault(counter, {})
        for key, delta in by_key.items():
            mine[key] = mine.get(key, 0) + delta


def keep_leaves(session: Session, name: str, by_counter: dict[Any, dict[tuple[Any, ...], Any]]) -> None:
    """Keep a flush's multi-level leaf deltas (per middle key) for the commit."""
    _add_leaves(current_entry(session).leaves.setdefault(name, {}), by_counter)


def held_leaves(session: Session, counter: Any, middle_key: tuple[Any, ...]) -> Any:
    """The leaf deltas of ``counter`` kept for the commit, for one middle row."""
    state = _states.get(session)
    if state is None:
        return 0
    return sum(by_counter.get(counter, {}).get(middle_key, 0)
               for entry in state.stack for by_counter in entry.leaves.values())


def take_leaves(session: Session, middle: Any, strategy_for: Any) -> list[tuple[str, Any]]:
    """The kept leaf deltas of counters through ``middle``'s class, as sinks of
    ``strategy_for(name)`` to translate now (its rows are about to be deleted)."""
    from .through import Sink

    state = _states.get(session)
    if state is None:
        return []
    taken: dict[str, dict[Any, dict[tuple[Any, ...], Any]]] = {}
    for entry in state.stack:
        for name, by_counter in entry.leaves.items():
            for counter in [c for c in by_counter if middle.isa(c.middle_mapper) or c.middle_mapper.isa(middle)]:
                _add_leaves(taken.setdefault(name, {}), {counter: by_counter.pop(counter)})
        entry.leaves = {name: by_counter for name, by_counter in entry.leaves.items() if by_counter}
    sinks = []
    for name, by_counter in taken.items():
        sink = Sink(strategy_for(name))
        sink.pending = by_counter
        sinks.append((name, sink))
    return sinks


def will_write(session: Session, parent: ParentTable, key: tuple[Any, ...]) -> bool:
    """Does the transaction hold ``deferred`` deltas for this parent row (written at commit)?"""
    state = _states.get(session)
    if state is None:
        return False
    for entry in state.stack:
        vector = entry.deferred.get(parent, {}).get(key)
        if vector is not None and any(vector):
            return True
    return False


def _translate_kept(session: Session, state: _SessionState) -> None:
    """At the commit: the kept leaf deltas to their parents' held deltas. The
    middle rows are locked first (children's tables before their parents'),
    for writing where this commit writes a counter of theirs too."""
    from .strategies import STRATEGY_CLASSES
    from .through import Sink

    kept: dict[str, dict[Any, dict[tuple[Any, ...], Any]]] = {}
    for entry in state.stack:
        for name, by_counter in entry.leaves.items():
            _add_leaves(kept.setdefault(name, {}), by_counter)
        entry.leaves = {}
    if not kept:
        return
    root = state.stack[0]
    for name, by_counter in sorted(kept.items()):
        strategy = STRATEGY_CLASSES[name](None)
        sink = Sink(strategy)
        sink.pending = by_counter
        sink.translate(lambda mapper: session.connection(bind_arguments={"mapper": mapper}),
                       lambda parent, key: will_write(session, parent, key))
        held = getattr(root, strategy.held)
        for parent, deltas in strategy.pending.items():
            add_deltas(held, parent, deltas)


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
    frame: FrameType | None = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return None
        if frame.f_code.co_name == "_prepare_impl":
            found = frame.f_locals.get("self")
            return found if isinstance(found, SessionTransaction) else None
        frame = frame.f_back
    return None


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
    _translate_kept(session, state)
    merged: dict[ParentTable, Deltas] = {}
    for entry in state.stack:
        for parent, deltas in entry.deferred.items():
            add_deltas(merged, parent, deltas)
        entry.deferred = {}
    for parent in sorted(merged, key=lambda p: p.lock_order):
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
        from . import shards

        shards.write(lambda parent: session.connection(bind_arguments={"mapper": parent.mapper}),
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
    counter = parent.counters[slot]
    if state is not None and getattr(counter, "middle_mapper", None) is not None:
        total += _kept_for(session, state, counter, key)
    return total


def _kept_for(session: Session, state: _SessionState, counter: Any, key: tuple[Any, ...]) -> Any:
    """What the kept leaf deltas of a multi-level counter add to one parent, by
    where their middle rows point now (read, not locked)."""
    from . import tracking

    by_middle: dict[tuple[Any, ...], Any] = {}
    for entry in state.stack:
        for by_counter in entry.leaves.values():
            for middle_key, delta in by_counter.get(counter, {}).items():
                by_middle[middle_key] = by_middle.get(middle_key, 0) + delta
    by_middle = {k: d for k, d in by_middle.items() if d}
    if not by_middle:
        return 0
    middle = tracking._child_for(counter.middle_mapper)
    connection = session.connection(bind_arguments={"mapper": counter.middle_mapper})
    found = tracking.read_foreign_keys(connection, middle, sorted(by_middle), lock=None)
    return sum(delta for middle_key, delta in by_middle.items()
               if tracking._key(found.get(middle_key), counter.middle_fk_keys) == key)


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
