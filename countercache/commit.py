"""The outermost COMMIT: what ``deferred`` and ``sharded`` counters held is written (private).

Right before the COMMIT (``before_commit`` of the outermost transaction,
after its final flush), in one pass and one lock order:

1. the multi-level leaf deltas kept per middle row (``transactions.keep_leaves``)
   are translated to their parents: the middle rows are read and locked, in
   key order, for writing where this commit writes a counter of theirs too
   (a direct counter on the same row), else shared;
2. the ``deferred`` deltas are written, parent tables in
   :attr:`~countercache.writer.ParentTable.lock_order` (a child's table
   before its parents'), keys ascending;
3. the ``sharded`` deltas go to the side table, after every parent row (the
   order ``fold()`` locks them in).

So a transaction locks nothing for its counters before its commit, however
often it flushes, and every commit locks in the same order: two transactions
cannot deadlock on counters (a direct and a multi-level counter on one row
included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, SessionTransaction

from . import memory, riding, transactions
from ._compat import calling_frame
from .children import _child_for, _key
from .kinds import MultiLevel
from .locking import read_foreign_keys
from .strategies import STRATEGY_CLASSES
from .through import Sink

if TYPE_CHECKING:
    from .writer import ParentTable


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
    if memory._unread.data:  # (read back what a savepoint's rollback expired; .data: no len() per commit)
        memory.read_back_unread(session)
    if not transactions.holds_any(session):
        # nothing deferred so far; a flush made now (the commit's final one)
        # still lands in the stack and is written by after_flush (or held
        # for the COMMIT itself: countercache.riding)
        transactions.set_committing(session, _ride)
        return
    # The final flush first, so that its deltas join the rest.
    session.flush()
    transactions.set_committing(session, _ride)
    if not transactions.writes_now(session):
        return  # written with the COMMIT itself (countercache.riding), at the connection's commit event
    write_deferred(session)


def _ride(session: Session) -> bool:
    """Can what the transaction holds be written with the COMMIT itself (and is it marked to)?"""
    return riding.will_ride(session, write_deferred)


def write_deferred(session: Session, connection_for: Any = None, values: bool = True) -> None:
    """Write everything the transaction holds for its commit, now: the kept
    leaf deltas translated first, then each strategy that holds deltas writes
    them where it keeps them (``deferred``: the parent rows; ``sharded``, after
    them, as ``fold()`` locks them: the side table).

    ``connection_for(mapper or parent table)`` gives the connection (by
    default the session's for it); ``values=False``: ask nothing back (the
    writes are sent with the COMMIT, answered with it), expire the
    counters of loaded parents instead."""
    transactions.stop_riding(session)
    kept = transactions.take_leaves(session)
    if kept:
        _translate_kept(session, kept, connection_for)
    for strategy in STRATEGY_CLASSES.values():
        if strategy.held is not None:
            strategy.write_held(session, connection_for, values)


def _translate_kept(session: Session, kept: dict[str, transactions.Leaves], connection_for: Any = None) -> None:
    """Kept leaf deltas to the held deltas of their parents (middle rows locked now)."""
    for name, by_counter in sorted(kept.items()):
        strategy = STRATEGY_CLASSES[name](None)
        sink = Sink(strategy)
        sink.pending = by_counter
        sink.translate(connection_for or (lambda mapper: session.connection(bind_arguments={"mapper": mapper})),
                       lambda parent, key: transactions.will_write(session, parent, key))
        transactions.hold(session, strategy.held, strategy.pending)


def held_delta(session: Session, parent: ParentTable, key: tuple[Any, ...], slot: int) -> Any:
    """What this session's transaction will add to one parent's counter at commit
    (kept leaf deltas of a multi-level counter by where their middle rows point
    now: read, not locked)."""
    total = transactions.held_delta(session, parent, key, slot)
    kind = parent.counters[slot].kind
    if not isinstance(kind, MultiLevel):
        return total
    by_middle: dict[tuple[Any, ...], Any] = {}
    for by_counter in transactions.peek_leaves(session):
        for middle_key, delta in by_counter.get(parent.counters[slot], {}).items():
            by_middle[middle_key] = by_middle.get(middle_key, 0) + delta
    by_middle = {k: d for k, d in by_middle.items() if d}
    if not by_middle:
        return total
    connection = session.connection(bind_arguments={"mapper": kind.middle_mapper})
    found = read_foreign_keys(connection, _child_for(kind.middle_mapper), sorted(by_middle), lock=None)
    return total + sum(delta for middle_key, delta in by_middle.items()
                       if _key(found.get(middle_key), kind.middle_fk_keys) == key)


SESSION_HOOKS = (("before_commit", _before_commit),)
