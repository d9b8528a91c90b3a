"""Every use of psycopg 3 beyond the DBAPI, in one place (private).

* :func:`send_with_commit`: the commit-time write and the COMMIT in one
  simple-protocol message (:mod:`countercache.riding`). The statements are
  first executed through SQLAlchemy as usual (events see them), on a cursor
  that records them with their values inline (psycopg's ``ClientCursor``
  quoting) instead of sending them: :func:`recording`.
* :func:`send_together`: statements whose answers are not needed at once (a
  lock and the UPDATE it precedes) in pipeline mode, answered together.

Private API used: ``Connection._pipeline`` (is the application's pipeline
open?); ``Connection.lock``, ``Connection.wait`` and ``psycopg.generators.execute``
(what psycopg's own ``commit()`` runs) to send the write with the COMMIT. Run against psycopg 3.3.9 (the tests); read against the source of
3.1, the floor in ``setup.cfg``. Where pipeline mode cannot be entered, the
statements go one by one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import exc

from ._compat import raise_dbapi_error


_pipeline_support: list[bool] = []


def can_ride(connection: Any) -> bool:
    """Is ``connection`` a sync psycopg 3 connection in a transaction of its own,
    outside any pipeline of the application's (:func:`send_with_commit` can end it)?"""
    dialect = connection.dialect
    if dialect.driver != "psycopg" or getattr(dialect, "is_async", False):
        return False
    dbapi_connection = connection.connection.dbapi_connection
    return (getattr(dbapi_connection, "_pipeline", False) is None
            and not getattr(dbapi_connection, "autocommit", True))


def can_pipeline(connection: Any) -> bool:
    """Is ``connection`` a sync psycopg 3 connection that can enter pipeline mode now?"""
    dialect = connection.dialect
    if dialect.driver != "psycopg" or getattr(dialect, "is_async", False):
        return False
    if not _pipeline_support:
        try:
            from psycopg import Pipeline

            _pipeline_support.append(bool(Pipeline.is_supported()))
        except Exception:  # noqa: BLE001 - an older psycopg, a libpq without pipelines
            _pipeline_support.append(False)
    if not _pipeline_support[0]:
        return False
    dbapi_connection = connection.connection.dbapi_connection
    return (getattr(dbapi_connection, "_pipeline", False) is None
            and not getattr(dbapi_connection, "autocommit", True))


_recording: list[Any] = []


def _recording_cursor() -> Any:
    """A psycopg ``ClientCursor`` that records each statement with its values
    inline (psycopg's own quoting, for the connection's encoding) instead of
    sending it: nothing is answered, as in pipeline mode."""
    if not _recording:
        from psycopg import ClientCursor

        class RecordingCursor(ClientCursor):  # type: ignore[type-arg,misc]
            def execute(self, query: Any, params: Any = None, **_: Any) -> Any:
                self.connection._countercache_recorded.append(self.mogrify(query, params))
                return self

            def executemany(self, query: Any, params_seq: Any, **_: Any) -> None:
                for params in params_seq:
                    self.connection._countercache_recorded.append(self.mogrify(query, params))

        _recording.append(RecordingCursor)
    return _recording[0]


@contextmanager
def recording(dbapi_connection: Any) -> Iterator[list[str]]:
    """While open, the statements SQLAlchemy executes on ``dbapi_connection`` are
    recorded (the list yielded: SQL text with the values inline), not sent."""
    recorded: list[str] = []
    factory = dbapi_connection.cursor_factory
    dbapi_connection._countercache_recorded = recorded
    dbapi_connection.cursor_factory = _recording_cursor()
    try:
        yield recorded
    finally:
        dbapi_connection.cursor_factory = factory
        del dbapi_connection._countercache_recorded


def send_with_commit(dbapi_connection: Any, statements: list[str]) -> None:
    """``statements``, then COMMIT, in one simple-protocol message: one round trip.
    A failed statement raises the driver's error; PostgreSQL skips the rest of
    the message, COMMIT included (the transaction is left open, aborted)."""
    from psycopg import errors, generators, pq

    pgconn = dbapi_connection.pgconn
    message = ";\n".join([*statements, "COMMIT"]).encode(dbapi_connection.info.encoding)
    with dbapi_connection.lock:  # (what a cursor's execute does, without its result objects)
        pgconn.send_query(message)
        results = dbapi_connection.wait(generators.execute(pgconn))
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise errors.error_from_result(result, encoding=dbapi_connection.info.encoding)


def end_transaction(dbapi_connection: Any) -> None:
    """Roll back a transaction left open (a write that failed before its COMMIT
    ran): SQLAlchemy takes a failed commit for an ended transaction and returns
    the connection to the pool without a rollback. A connection that cannot be
    brought back to normal is closed (the pool replaces it)."""
    try:
        if dbapi_connection is not None and not dbapi_connection.closed \
                and dbapi_connection.pgconn.transaction_status != 0:
            dbapi_connection.rollback()
    except Exception:  # noqa: BLE001 - unusable: let the pool replace it
        try:
            dbapi_connection.close()
        except Exception:  # noqa: BLE001 - already gone
            pass


def send_together(connection: Any, statements: Sequence[tuple[Any, dict[str, Any]]]) -> None:
    """Execute statements whose answers are not read, in one round trip where
    psycopg can (else one by one). A failure raises as SQLAlchemy's
    ``DBAPIError`` subclass of the driver's error, as an execute would."""
    if len(statements) < 2 or not can_pipeline(connection) or \
            hasattr(connection.connection.dbapi_connection, "_countercache_recorded"):  # (recorded: sent later)
        for statement, params in statements:
            connection.execute(statement, params)
        return
    dbapi_connection = connection.connection.dbapi_connection
    try:
        with dbapi_connection.pipeline():
            for statement, params in statements:
                connection.execute(statement, params)
    except exc.DBAPIError:
        raise
    except connection.dialect.loaded_dbapi.Error as error:  # (raised by the closing sync)
        raise_dbapi_error(connection, error, str(statements[-1][0]), statements[-1][1])
