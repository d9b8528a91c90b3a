"""Transactions and savepoints: what a rollback must take back (private).

Each session keeps a stack with one entry per open transaction boundary
(the root transaction and each ``begin_nested()`` savepoint) that has
something to remember:

* ``deferred`` / ``sharded``: deltas of those strategies, summed over the
  flushes made inside that boundary, written once right before the
  outermost COMMIT (to the parent rows, or to the shard rows);
* ``leaves``: multi-level leaf deltas of those strategies, per middle row,
  translated to their parents at the commit (:mod:`countercache.commit`);
* ``refreshed``: parents whose in-memory counter the library set inside a
  savepoint. SQLAlchemy expires only dirty objects when a savepoint rolls
  back, so the library expires these itself.

A savepoint that is released hands its entry to the enclosing boundary; one
that rolls back drops it (expiring what it refreshed). The root's rollback
drops everything (SQLAlchemy expires every object itself then). The
commit itself is :mod:`countercache.commit`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction

from . import memory, shard_writes, sidetable
from ._compat import commits_elsewhere

if TYPE_CHECKING:
    from .writer import Deltas, ParentTable

#: Multi-level leaf deltas: counter -> {middle row key: delta}.
Leaves = dict[Any, dict[tuple[Any, ...], Any]]


class _Entry:
    __slots__ = ("_transaction", "deferred", "sharded", "refreshed", "deleted", "leaves")

    def __init__(self, transaction: SessionTransaction) -> None:
        # (weakly: a transaction holds its session, which must not outlive its
        # last reference because of this entry, kept by the session's key)
        self._transaction = weakref.ref(transaction)
        self.deferred: dict[ParentTable, Deltas] = {}
        self.sharded: dict[ParentTable, Deltas] = {}
        #: (parent, keys, {key: values shown before}) set in memory, in order
        self.refreshed: list[tuple[ParentTable, list[tuple[Any, ...]], dict[Any, Any]]] = []
        #: parents with sharded counters deleted inside this boundary
        self.deleted: dict[ParentTable, set[tuple[Any, ...]]] = {}
        #: multi-level leaf deltas of deferred / sharded counters, per middle
        #: row, translated at the commit: strategy name -> counter -> {middle key: delta}
        self.leaves: dict[str, Leaves] = {}

    @property
    def transaction(self) -> SessionTransaction | None:
        return self._transaction()

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
            add_leaves(self.leaves.setdefault(name, {}), by_counter)
        self.refreshed.extend(other.refreshed)


class _SessionState:
    __slots__ = ("stack", "committing", "riding", "decide", "shard_parents")

    def __init__(self) -> None:
        self.stack: list[_Entry] = []
        #: True from the outermost before_commit until the transaction ends:
        #: a flush made by another before_commit hook is written at once.
        self.committing = False
        #: While committing: does what the transaction holds wait for the
        #: COMMIT itself (:mod:`countercache.riding`; a flush made meanwhile
        #: holds too)? None: not decided yet (the final flush decides).
        self.riding: bool | None = None
        #: ``decide(session)``: can it (and, if so, mark it to)? None: it cannot
        self.decide: Any = None
        #: the parent tables of the last shard write (their counters named where the side table is missing)
        self.shard_parents: tuple[ParentTable, ...] = ()


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


def add_leaves(into: Leaves, by_counter: Leaves) -> None:
    for counter, by_key in by_counter.items():
        mine = into.setdefault(counter, {})
        for key, delta in by_key.items():
            mine[key] = mine.get(key, 0) + delta


def keep_leaves(session: Session, name: str, by_counter: Leaves) -> None:
    """Keep a flush's multi-level leaf deltas (per middle key) for the commit."""
    add_leaves(current_entry(session).leaves.setdefault(name, {}), by_counter)


def held_leaves(session: Session, counter: Any, middle_key: tuple[Any, ...]) -> Any:
    """The leaf deltas of ``counter`` kept for the commit, for one middle row."""
    state = _states.get(session)
    if state is None:
        return 0
    return sum(by_counter.get(counter, {}).get(middle_key, 0)
               for entry in state.stack for by_counter in entry.leaves.values())


def take_leaves(session: Session, accept: Any = None) -> dict[str, Leaves]:
    """Take the kept leaf deltas (of the counters ``accept(counter)`` accepts,
    or all): strategy name -> counter -> {middle key: delta}."""
    taken: dict[str, Leaves] = {}
    state = _states.get(session)
    for entry in state.stack if state is not None else ():
        for name, by_counter in entry.leaves.items():
            for counter in [c for c in by_counter if accept is None or accept(c)]:
                add_leaves(taken.setdefault(name, {}), {counter: by_counter.pop(counter)})
        entry.leaves = {name: by_counter for name, by_counter in entry.leaves.items() if by_counter}
    return taken


def peek_leaves(session: Session) -> list[Leaves]:
    """The kept leaf deltas of every boundary and strategy (not taken)."""
    state = _states.get(session)
    return [by_counter for entry in (state.stack if state is not None else ()) for by_counter in entry.leaves.values()]


def will_write(session: Session, parent: ParentTable, key: tuple[Any, ...]) -> bool:
    """Does the transaction hold ``deferred`` deltas for this parent row (written at commit)?"""
    state = _states.get(session)
    for entry in state.stack if state is not None else ():
        vector = entry.deferred.get(parent, {}).get(key)
        if vector is not None and any(vector):
            return True
    return False


def held_deltas(session: Session, attribute: str) -> dict[ParentTable, Deltas]:
    """Take the ``deferred`` or ``sharded`` deltas of every boundary, summed."""
    merged: dict[ParentTable, Deltas] = {}
    state = _states.get(session)
    for entry in state.stack if state is not None else ():
        for parent, deltas in getattr(entry, attribute).items():
            add_deltas(merged, parent, deltas)
        setattr(entry, attribute, {})
    return merged


def hold(session: Session, attribute: str, pending: dict[ParentTable, Deltas]) -> None:
    """Add deltas to the innermost boundary's ``deferred`` or ``sharded`` deltas."""
    held = getattr(current_entry(session), attribute)
    for parent, deltas in pending.items():
        add_deltas(held, parent, deltas)


def set_committing(session: Session, decide: Any = None) -> None:
    """From the outermost before_commit on, a flush writes at once (or, where
    the held write can wait for the COMMIT itself, holds for it: ``decide``,
    asked once the transaction's connection exists; see :func:`writes_now`)."""
    state = _states.get(session)
    if state is None:
        state = _states[session] = _SessionState()
    state.committing = True
    state.decide = decide


def stop_riding(session: Session) -> None:
    """The held write is being made: a flush from now on writes at once."""
    state = _states.get(session)
    if state is not None:
        state.riding = False


def held_items(session: Session) -> list[tuple[ParentTable, Deltas]]:
    """Every ``(parent table, deltas)`` the transaction holds (deferred and sharded, per boundary)."""
    state = _states.get(session)
    return [item for entry in (state.stack if state is not None else ())
            for held in (entry.deferred, entry.sharded) for item in held.items()]


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


def writes_now(session: Session) -> bool:
    """Must what ``deferred`` / ``sharded`` hold for the commit be written at
    this flush? Yes during the commit, and where the session's commit is
    not what makes its rows durable (a Connection given to it, whose owner
    commits; ``AUTOCOMMIT``): held deltas would be lost there."""
    state = _states.get(session)
    if state is not None and state.committing:
        if state.riding is None:  # (decided once, when the transaction's connection exists)
            state.riding = bool(state.decide is not None and state.decide(session))
        return not state.riding
    return commits_elsewhere(session)


def holds_shards(session: Session) -> bool:
    """Does the transaction hold sharded deltas, or deleted parents' shard rows to forget?"""
    state = _states.get(session)
    return state is not None and any(e.sharded or e.deleted for e in state.stack)


def remember_refreshed(session: Session, parent: ParentTable, keys: list[tuple[Any, ...]]) -> None:
    """Inside a savepoint, note parents whose counters are about to be set in memory,
    with the values they show now (restored if it rolls back)."""
    if keys and session.in_nested_transaction():
        current_entry(session).refreshed.append((parent, keys, memory.loaded_values(session, parent, keys)))


# -- session hooks ------------------------------------------------------------


def write_shards(session: Session, connection_for: Any = None, queued: bool = False) -> None:
    """Write the sharded deltas of the transaction now, and forget deleted parents' rows
    (on ``connection_for(parent table)``, by default the session's connection for it)."""
    state = _states.get(session)
    if state is None:
        return
    sharded = held_deltas(session, "sharded")
    deleted: dict[ParentTable, set[tuple[Any, ...]]] = {}
    for entry in state.stack:
        for parent, keys in entry.deleted.items():
            deleted.setdefault(parent, set()).update(keys)
        entry.deleted = {}
    if sharded or deleted:
        if connection_for is None:
            def connection_for(parent: ParentTable) -> Any:
                return session.connection(bind_arguments={"mapper": parent.mapper})
        state.shard_parents = (*sharded, *deleted)
        try:
            shard_writes.write(connection_for, sharded, deleted, queued)
        except DBAPIError as error:
            sidetable.raise_if_missing(shard_names(session), error)
            raise


def shard_names(session: Session) -> list[str]:
    """The ``sharded`` counters the session's last shard write was for (asked on its error only)."""
    state = _states.get(session)
    parents = () if state is None else state.shard_parents
    return sorted({c.name for parent in parents for c in parent.counters if c.strategy() == "sharded"})


def parent_deleted(session: Session, parent: ParentTable, key: tuple[Any, ...]) -> None:
    """A parent with sharded counters was deleted: its shard rows go at commit."""
    current_entry(session).deleted.setdefault(parent, set()).add(key)


def reuse_deleted(session: Session, parent: ParentTable, key: tuple[Any, ...]) -> bool:
    """A key this transaction deleted a parent under is taken again (a re-keyed
    parent): the commit must no longer forget that key's shard rows; did it hold it?"""
    state = _states.get(session)
    found = False
    for entry in state.stack if state is not None else ():
        keys = entry.deleted.get(parent)
        if keys is not None and key in keys:
            keys.discard(key)
            found = True
    return found


def rekey(session: Session, attribute: str, parent: ParentTable, old: tuple[Any, ...], new: tuple[Any, ...]) -> None:
    """A parent's primary key changed: what the transaction holds for ``old``
    is for ``new`` (held in the innermost boundary: a savepoint rolled back
    takes the change of key and this back together)."""
    total = _held_total(session, attribute, parent, old)
    if any(total):
        hold(session, attribute, {parent: {old: [-d for d in total], new: total}})


def _held_total(session: Session, attribute: str, parent: ParentTable, key: tuple[Any, ...]) -> list[Any]:
    state = _states.get(session)
    total = parent.new_vector()
    for entry in state.stack if state is not None else ():
        vector = getattr(entry, attribute).get(parent, {}).get(key)
        if vector is not None:
            total = [a + b for a, b in zip(total, vector)]
    return total


def take_back(session: Session, attribute: str, parent: ParentTable, key: tuple[Any, ...],
              slots: Any = None) -> None:
    """A parent row is deleted (or recounted; ``slots``: those counters only): what the transaction
    holds for it must not reach a row that a later flush inserts with the same key. The innermost
    boundary holds the opposite: a savepoint rolled back takes the delete and this back together."""
    total = [d if slots is None or i in slots else 0 for i, d in enumerate(_held_total(session, attribute, parent, key))]
    if any(total):
        hold(session, attribute, {parent: {key: [-d for d in total]}})


def holds_any(session: Session) -> bool:
    """Does this session's transaction hold deferred or sharded deltas for its commit?"""
    if not _states.data:  # (no session holds anything: asked at every commit)
        return False
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
        memory._unread.pop(session, None)  # (nothing to read back at a commit of this transaction)
        return
    kept, refreshed = [], []
    for entry in state.stack:
        if _within(entry.transaction, boundary):
            refreshed.extend(entry.refreshed)
        else:
            kept.append(entry)
    state.stack[:] = kept
    memory.take_back(session, refreshed, boundary)


def _within(transaction: SessionTransaction | None, boundary: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is boundary:
            return True
        transaction = transaction.parent
    return False


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if not transaction.nested and transaction.parent is not None:
        return  # a subtransaction (a flush's): the stack has entries for the root and savepoints only
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
    ("after_rollback", _after_rollback),
    ("after_transaction_end", _after_transaction_end),
)
