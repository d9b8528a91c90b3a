"""Every use of psycopg 3 beyond the DBAPI, in one place (private).

* :func:`send_with_commit`: the commit-time write and the COMMIT in one
  simple-protocol message (:mod:`countercache.riding`). The statements are
  first executed through SQLAlchemy as usual (events see them), on a cursor
  that records them with their values inline (psycopg's ``ClientCursor``
  quoting) instead of sending them: :func:`recording`.
* :func:`send_together`: statements whose answers are not needed at once (a
  lock and the UPDATE it precedes) in pipeline mode, answered together.
* :func:`carry`: a read whose answer is needed only after the connection's
  next statement (the flush's locking pre-read of the rows its DELETE
  removes) sent in pipeline mode with that statement if it is a DELETE:
  both run in order, in one round trip; before any other statement the read
  runs first, on its own. The connection's ``cursor_factory`` is swapped for
  a subclass of it until then (:func:`take_carried`).

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


_carrying: dict[Any, Any] = {}


def carry(dbapi_connection: Any, sql: str, parameters: Any, done: Any) -> bool:
    """Run ``sql`` before the connection's next statement (with it in pipeline mode,
    one round trip for both, if it is a DELETE) and call ``done(rows)`` before its
    answer is read. False (nothing done) where the connection's cursors are not
    psycopg's plain ones or its statements are being recorded. The caller has
    checked :func:`can_pipeline`."""
    from psycopg import Cursor

    pending = getattr(dbapi_connection, "_countercache_carried", None)
    if pending is None:
        factory = dbapi_connection.cursor_factory
        if factory is not Cursor or hasattr(dbapi_connection, "_countercache_recorded"):
            return False
        pending = dbapi_connection._countercache_carried = (factory, [])
        dbapi_connection.cursor_factory = _carrying_cursor(factory)
    pending[1].append((sql, parameters, done))
    return True


def take_carried(dbapi_connection: Any) -> list[tuple[str, Any, Any]]:
    """The reads waiting for the connection's next statement, no longer waiting
    (its own cursor factory back)."""
    pending = getattr(dbapi_connection, "_countercache_carried", None)
    if pending is None:
        return []
    del dbapi_connection._countercache_carried
    dbapi_connection.cursor_factory = pending[0]
    return pending[1]  # type: ignore[no-any-return]


def run_carried(connections: list[Any]) -> None:
    """Run now, one by one, the reads still waiting on these (SQLAlchemy)
    connections for a next statement; the list is emptied."""
    if not connections:
        return
    waiting = list(connections)
    connections.clear()
    for connection in waiting:
        dbapi_connection = connection.connection.dbapi_connection
        for sql, parameters, done in take_carried(dbapi_connection):
            cursor = dbapi_connection.cursor()
            try:
                _read_now(cursor, sql, parameters, done)
            except connection.dialect.loaded_dbapi.Error as error:
                raise_dbapi_error(connection, error, sql, parameters)
            finally:
                cursor.close()


def _read_now(cursor: Any, sql: str, parameters: Any, done: Any) -> None:
    cursor.execute(sql, parameters)
    done(cursor.fetchall())


def drop_carried(connections: list[Any]) -> None:
    """Forget the reads waiting on these connections (their flush failed); the list is emptied."""
    for connection in connections:
        try:
            dbapi_connection = connection.connection.dbapi_connection
        except Exception:  # noqa: BLE001 - closed or invalidated: nothing waits there any more
            continue
        if dbapi_connection is not None:
            take_carried(dbapi_connection)
    connections.clear()


def _carrying_cursor(factory: Any) -> Any:
    """A subclass of the cursor class ``factory`` whose first statement takes the
    connection's waiting reads along (see :func:`carry`)."""
    carrying = _carrying.get(factory)
    if carrying is not None:
        return carrying

    def with_reads(cursor: Any, query: Any, send: Any) -> None:
        reads = take_carried(cursor.connection)
        if not reads:
            send()
            return
        readers = [factory(cursor.connection) for _ in reads]
        try:
            if not (isinstance(query, str) and query.lstrip()[:6].upper() == "DELETE"):
                # not the DELETE the reads wait for: they run first, on their own
                for reader, (sql, parameters, done) in zip(readers, reads):
                    _read_now(reader, sql, parameters, done)
                send()
                return
            with cursor.connection.pipeline():  # (an error: raised here, for the DELETE)
                for reader, (sql, parameters, _) in zip(readers, reads):
                    reader.execute(sql, parameters)
                send()
            for reader, (_, _, done) in zip(readers, reads):
                done(reader.fetchall())
        finally:
            for reader in readers:
                reader.close()

    class CarryingCursor(factory):  # type: ignore[misc,valid-type]
        def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
            with_reads(self, query, lambda: factory.execute(self, query, params, **kw))
            return self

        def executemany(self, query: Any, params_seq: Any, **kw: Any) -> None:
            with_reads(self, query, lambda: factory.executemany(self, query, params_seq, **kw))

    carrying = _carrying[factory] = CarryingCursor
    return carrying


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
