"""The commit-time write riding with the COMMIT (private).

``deferred`` and ``sharded`` write what a transaction holds once, at its
commit. Sent as statements of their own, those writes cost a round trip to
the database before the COMMIT's; where the database is across a network,
that round trip is most of their cost. With psycopg 3 (sync) on
PostgreSQL they are sent in pipeline mode instead, right before SQLAlchemy
sends the COMMIT, and the COMMIT goes in the same pipeline: the writes and
the COMMIT travel together and are answered together, so an insert-only
transaction costs the round trips it costs without counters.

When and how:

* From the outermost ``before_commit`` on (:mod:`countercache.commit`),
  the first flush that holds something for the commit (the final one, or
  ``before_commit`` itself when earlier flushes held deltas) asks
  :func:`will_ride`: one connection in the transaction, psycopg 3 (sync,
  pipeline mode available in its libpq), a transaction the session's commit
  ends (no ``AUTOCOMMIT``, no Connection given to the session, not
  two-phase). Then nothing is written yet: the connection's transaction,
  among those the session's commit ends, is stood in for by one whose
  ``commit()`` (the last moment before SQLAlchemy calls the driver's)
  writes everything in one pass, in the same lock order as before.
* At that moment, if the write needs no answer from the database (no
  multi-level leaf deltas to translate, which read and lock middle rows; no
  text keys to match with the stored spelling; no parent in memory whose
  new value a ``RETURNING`` would give, where the commit does not expire
  them anyway), the connection enters pipeline mode first and the
  statements are queued; the driver's ``commit()`` then sends the COMMIT
  and the sync, and waits once. Otherwise the same writes run as plain
  statements (still at the last moment, still one pass).
* What the contract promises does not change. A failed write fails the
  COMMIT (PostgreSQL skips the rest of an aborted pipeline): the driver's
  ``commit()`` raises the write's error, the transaction is rolled back,
  nothing of it is kept. Other ``before_commit`` listeners run first, and a
  flush they make is held for this one write. Loaded parents whose counters
  a pipelined write changed are expired (the commit's own expiry does the
  same a moment later): nothing in memory is stale.
* Pipeline mode is left by the stand-in's ``commit()`` itself, right after
  the driver's: after the COMMIT's sync nothing is in flight, and leaving
  costs no round trip; after a failure, through a sync, and the transaction
  the failed write kept open is rolled back. No listener is involved: a
  connection never goes back to the pool in pipeline mode.

asyncpg, psycopg's async connections (through ``AsyncSession``) and the
MySQL drivers write as before, as statements of their own: asyncpg and the
MySQL protocol have no pipeline SQLAlchemy's sync facade could use, and an
async psycopg pipeline would have to be driven from the event loop.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from . import _compat, _psycopg, transactions

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

def will_ride(session: Session, write: Any) -> bool:
    """Can the held writes wait for the COMMIT itself? If so, mark them to be
    made then by ``write(session, connection_for, values=...)``
    (:func:`countercache.commit.write_deferred`)."""
    transaction = session.get_transaction()
    if transaction is None or session.twophase:
        return False
    # (keyed by the engine and by the connection: the same entry twice)
    connections = set(transaction._connections.values())
    if len(connections) != 1:
        return False
    ((connection, _, should_commit, autoclose),) = connections
    if not should_commit or not autoclose or connection._is_autocommit_isolation():
        return False
    if not _psycopg.can_pipeline(connection):
        return False
    _compat.replace_transaction(transaction, connection,
                                lambda real: _CommitWithWrite(real, connection, session, write))
    return True


class _CommitWithWrite:
    """Stands in for the connection's transaction among the connections the
    session's commit ends (``SessionTransaction._connections``): its
    ``commit()``, the last moment before SQLAlchemy sends the COMMIT, makes
    the held write first. (Not an engine or connection ``commit`` listener:
    a listener makes SQLAlchemy dispatch events for every statement, and
    registering one per transaction costs more than the round trip saved.)"""

    __slots__ = ("_transaction", "_connection", "_session", "_write")

    def __init__(self, transaction: Any, connection: Connection, session: Session, write: Any) -> None:
        self._transaction = transaction
        self._connection = connection
        self._session = weakref.ref(session)
        self._write = write

    def __getattr__(self, name: str) -> Any:  # (is_active, close(), rollback()...: the transaction's)
        return getattr(self._transaction, name)

    def commit(self) -> None:
        session = self._session()
        piped = None
        if session is not None and transactions.holds_any(session):
            piped = _write_with_commit(self._connection, session, self._write)
        try:
            self._transaction.commit()
        except BaseException:
            if piped is not None:
                # a write that failed kept PostgreSQL from running the COMMIT: the
                # transaction is still open (aborted), and SQLAlchemy, which takes
                # a failed commit for an ended transaction, would hand the
                # connection back to the pool so: end it here
                _psycopg.leave_pipeline(piped, end_transaction=True)
            raise
        if piped is not None:
            _psycopg.leave_pipeline(piped)  # (after the COMMIT's sync: at once)


def _write_with_commit(connection: Connection, session: Session, write_deferred: Any) -> Any:
    """The held write, queued in pipeline mode where it needs no answers (the
    driver's ``commit()``, next, sends it with the COMMIT), else as
    statements. Returns the DBAPI connection left in pipeline mode, or None."""

    def connection_for(_: Any) -> Connection:
        return connection

    dbapi_connection = None if _needs_answers(session) else _psycopg.enter_pipeline(connection)
    try:
        if dbapi_connection is None:  # (answers needed, or the driver would not: plain statements)
            write_deferred(session, connection_for)
        else:
            write_deferred(session, connection_for, values=False)
    except BaseException:
        # the COMMIT will not be sent: end the transaction here (nothing of it is kept)
        _psycopg.leave_pipeline(_compat.dbapi_connection_of(connection), end_transaction=True)
        raise
    return dbapi_connection


def _needs_answers(session: Session) -> bool:
    """Does the held write read anything back before the COMMIT? Kept
    multi-level leaf deltas (their middle rows are read and locked), text keys
    (matched with their stored spelling), new values for parents in memory
    that the commit will not expire."""
    if any(by_counter for by_counter in transactions.peek_leaves(session)):
        return True
    identity_map = session.identity_map
    for parent, deltas in transactions.held_items(session):
        if parent.string_keys:
            return True
        if identity_map and not session.expire_on_commit:
            key_from_pk = parent.mapper.identity_key_from_primary_key
            if any(key_from_pk(tuple(k)) in identity_map for k in deltas):
                return True
    return False
