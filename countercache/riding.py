"""The commit-time write riding with the COMMIT (private).

``deferred`` and ``sharded`` write what a transaction holds once, at its
commit. Sent as statements of their own, those writes cost a round trip to
the database before the COMMIT's; where the database is across a network,
that round trip is most of their cost. With psycopg 3 (sync) on
PostgreSQL they are sent in the COMMIT's own message instead: one
simple-protocol message ``<writes>; COMMIT``, answered once, so an
insert-only transaction costs the round trips it costs without counters.
(Measured on one machine, ``bench.txn_floor``: this costs psycopg less
than pipeline mode, which this module used before: x1.13 against x1.27 of
a transaction without the write; end to end, with the change tracking
around it, the difference is within noise. It also needs no private API.)

When and how:

* From the outermost ``before_commit`` on (:mod:`countercache.commit`),
  the first flush that holds something for the commit (the final one, or
  ``before_commit`` itself when earlier flushes held deltas) asks
  :func:`will_ride`: one connection in the transaction, psycopg 3 (sync,
  outside a pipeline of the application's), a transaction the session's
  commit ends (no ``AUTOCOMMIT``, no Connection given to the session, not
  two-phase). Then nothing is written yet: the connection's transaction,
  among those the session's commit ends, is stood in for by one whose
  ``commit()`` (the last moment before SQLAlchemy calls the driver's)
  writes everything in one pass, in the same lock order as before.
* At that moment, if the write needs no answer from the database (no
  multi-level leaf deltas to translate, which read and lock middle rows; no
  text keys to match with the stored spelling; no parent in memory whose
  new value a ``RETURNING`` would give, where the commit does not expire
  them anyway), its statements are executed through SQLAlchemy as always
  (events see each, with its parameters) on a cursor that records them with
  their values inline, and then sent with ``COMMIT`` in one message; the
  driver's ``commit()`` finds the transaction ended and sends nothing.
  Otherwise the same writes run as plain statements (still at the last
  moment, still one pass) and the driver's ``commit()`` sends the COMMIT.
* What the contract promises does not change. A failed write fails the
  commit: PostgreSQL skips the rest of the message, COMMIT included; the
  error is raised as SQLAlchemy's (``handle_error`` listeners see it), the
  transaction is rolled back, nothing of it is kept. Other
  ``before_commit`` listeners run first, and a flush they make is held for
  this one write. Loaded parents whose counters the write changed are
  expired (the commit's own expiry does the same a moment later): nothing
  in memory is stale. An engine ``commit`` listener runs after the database
  committed (SQLAlchemy dispatches it before calling the driver).

asyncpg, psycopg's async connections (through ``AsyncSession``) and the
MySQL drivers write as before, as statements of their own: asyncpg and the
MySQL drivers send parameters apart from the SQL (no message could carry
the COMMIT with them), and an async psycopg cursor would have to be driven
from the event loop.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from . import _compat, _psycopg, sidetable, transactions

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
    if not _psycopg.can_ride(connection):
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
        if session is not None and transactions.holds_any(session):
            _write_with_commit(self._connection, session, self._write)
        self._transaction.commit()  # (the driver's commit(): nothing left to do where the write sent the COMMIT)


def _write_with_commit(connection: Connection, session: Session, write_deferred: Any) -> None:
    """The held write, sent with the COMMIT in one message where it needs no
    answers (the driver's ``commit()``, next, then finds the transaction
    ended), else as statements."""

    def connection_for(_: Any) -> Connection:
        return connection

    if _needs_answers(session):
        write_deferred(session, connection_for)
        return
    dbapi_connection = _compat.dbapi_connection_of(connection)
    try:
        with _psycopg.recording(dbapi_connection) as statements:
            write_deferred(session, connection_for, values=False)
        if statements:
            try:
                _psycopg.send_with_commit(dbapi_connection, statements)
            except connection.dialect.loaded_dbapi.Error as error:
                sidetable.raise_if_missing(transactions.shard_names(session), error)
                _compat.raise_dbapi_error(connection, error, ";\n".join([*statements, "COMMIT"]), None)
    except BaseException:
        # the COMMIT did not run: end the transaction here (nothing of it is kept)
        _psycopg.end_transaction(_compat.dbapi_connection_of(connection))
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
            # (any loaded parent of the class, not only those under the keys held:
            # a key given in another form than its type loads, a text UUID, say,
            # finds no identity, and only RETURNING brings back the loaded form)
            cls = parent.mapper.class_
            if any(isinstance(obj, cls) for obj in identity_map.values()):
                return True
    return False
