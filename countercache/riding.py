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
* Pipeline mode is left right after the COMMIT (``after_commit``), or when
  it failed (the engine's ``handle_error``), or at the latest when the
  pool resets the connection: a connection never goes back to the pool in
  pipeline mode. Leaving after a finished sync costs no round trip.

asyncpg, psycopg's async connections (through ``AsyncSession``) and the
MySQL drivers write as before, as statements of their own: asyncpg and the
MySQL protocol have no pipeline SQLAlchemy's sync facade could use, and an
async psycopg pipeline would have to be driven from the event loop.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from . import _compat, _psycopg, transactions

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session

#: engines with this module's listeners
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
#: sessions whose connection entered pipeline mode for the commit -> its DBAPI connection
_piped: weakref.WeakKeyDictionary[Session, Any] = weakref.WeakKeyDictionary()
#: the same, the other way: DBAPI connection in pipeline mode -> its session (weakly)
_piped_by_dbapi: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


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
    engine = connection.engine
    if engine not in _engines:
        _listen(engine)
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
        if session is not None and transactions.holds_any(session):
            _write_with_commit(self._connection, session, self._write)
        self._transaction.commit()


def _write_with_commit(connection: Connection, session: Session, write_deferred: Any) -> None:
    """The held write, queued in pipeline mode where it needs no answers (the
    driver's ``commit()``, next, sends it with the COMMIT), else as statements."""

    def connection_for(_: Any) -> Connection:
        return connection

    dbapi_connection = None if _needs_answers(session) else _psycopg.enter_pipeline(connection)
    try:
        if dbapi_connection is None:  # (answers needed, or the driver would not: plain statements)
            write_deferred(session, connection_for)
            return
        _piped[session] = dbapi_connection
        _piped_by_dbapi[dbapi_connection] = weakref.ref(session)
        write_deferred(session, connection_for, values=False)
    except BaseException:
        # the COMMIT will not be sent: end the transaction here (nothing of it is kept)
        _piped.pop(session, None)
        _piped_by_dbapi.pop(dbapi_connection, None) if dbapi_connection is not None else None
        _psycopg.leave_pipeline(_compat.dbapi_connection_of(connection), end_transaction=True)
        raise


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


def _leave(session: Session) -> None:
    dbapi_connection = _piped.pop(session, None)
    if dbapi_connection is not None:
        _piped_by_dbapi.pop(dbapi_connection, None)
        _psycopg.leave_pipeline(dbapi_connection)


def _leave_dbapi(dbapi_connection: Any, end_transaction: bool = False) -> None:
    found = _piped_by_dbapi.pop(dbapi_connection, None) if dbapi_connection is not None else None
    if found is not None:
        session = found()
        if session is not None:
            _piped.pop(session, None)
        _psycopg.leave_pipeline(dbapi_connection, end_transaction)


def _after_commit(session: Session) -> None:
    if _piped:
        _leave(session)


def _after_rollback(session: Session) -> None:
    if _piped:
        _leave(session)


def _handle_error(context: Any) -> None:
    """A statement or the COMMIT failed: a pipeline entered for it is left now,
    and the transaction ended if the failed write kept PostgreSQL from running
    the COMMIT (it is then still open, aborted)."""
    if _piped_by_dbapi:
        _leave_dbapi(_compat.dbapi_connection_of(context.connection), end_transaction=True)


def _reset(dbapi_connection: Any, record: Any, reset_state: Any) -> None:
    """The pool takes the connection back: never in pipeline mode."""
    if _piped_by_dbapi:
        _leave_dbapi(dbapi_connection)


def _listen(engine: Engine) -> None:
    # (handle_error is the dialect's: dispatched on errors only; reset, once per checkin)
    event.listen(engine, "handle_error", _handle_error)
    event.listen(engine.pool, "reset", _reset)
    _engines.add(engine)


def uninstall() -> None:
    """Remove every listener this module added (engines and their pools)."""
    for engine in list(_engines):
        for target, name, fn in ((engine, "handle_error", _handle_error), (engine.pool, "reset", _reset)):
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
    _engines.clear()
    for dbapi_connection in list(_piped_by_dbapi):
        _leave_dbapi(dbapi_connection)
    _piped.clear()


SESSION_HOOKS = (
    ("after_commit", _after_commit),
    ("after_rollback", _after_rollback),
)
