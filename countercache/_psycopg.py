"""Every use of psycopg 3's private API, in one place (private).

Pipeline mode lets statements whose answers are not needed at once travel
with the next statement that waits (:mod:`countercache.riding`: the
commit-time write with the COMMIT; :func:`send_together`: a lock and the
UPDATE it precedes). Entering it through ``Connection.pipeline()`` is public,
but leaving it that way always sends a sync and waits for it (a round
trip); after the COMMIT's own sync nothing is in flight, and libpq can leave
at once. So this module uses ``Connection._pipeline``, ``Pipeline(conn)``,
``Pipeline._exit()`` and ``Pipeline.command_queue`` / ``result_queue``.
Run against psycopg 3.3.9 (the tests); read against the source of 3.1, the
floor in ``setup.cfg`` (``_exit()`` takes no argument there, the rest is
the same). Where pipeline mode cannot be entered, nothing is pipelined and
the statements go one by one, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import exc

from ._compat import raise_dbapi_error


_pipeline_support: list[bool] = []


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


def enter_pipeline(connection: Any) -> Any:
    """Put the connection's psycopg connection in pipeline mode (no round
    trip): statements are queued until the next sync (the COMMIT's). Returns
    the DBAPI connection, or None where it cannot be done."""
    dbapi_connection = connection.connection.dbapi_connection
    if getattr(dbapi_connection, "_pipeline", False) is not None:
        return None
    from psycopg import Pipeline

    pipeline = Pipeline(dbapi_connection)
    dbapi_connection._pipeline = pipeline
    try:
        pipeline.__enter__()
    except Exception:  # noqa: BLE001 - not possible now: write as plain statements
        dbapi_connection._pipeline = None
        return None
    return dbapi_connection


def leave_pipeline(dbapi_connection: Any, end_transaction: bool = False) -> None:
    """Leave pipeline mode: at once where the last sync left nothing in flight
    (after the COMMIT), else through a sync (one round trip; a failure path,
    where the pending error is dropped: it was raised already). With
    ``end_transaction``, a transaction left open (a write that failed before
    its COMMIT ran, which PostgreSQL then skipped) is rolled back: SQLAlchemy
    takes a failed commit for an ended transaction and returns the connection
    to the pool without a rollback. A connection that cannot be brought back
    to normal is closed (the pool replaces it)."""
    try:
        _leave(dbapi_connection, end_transaction)
    except Exception:  # noqa: BLE001 - a connection already gone (closed, invalidated): nothing to leave
        pass


def _leave(dbapi_connection: Any, end_transaction: bool) -> None:
    if dbapi_connection is None:  # (invalidated: SQLAlchemy let go of it)
        return
    pipeline = getattr(dbapi_connection, "_pipeline", None)
    if pipeline is not None:
        idle = (not pipeline.command_queue and not pipeline.result_queue
                and dbapi_connection.pgconn.pipeline_status == 1)  # (1: PQ_PIPELINE_ON, not aborted)
        try:
            if idle:
                try:
                    pipeline._exit(None)  # (psycopg 3.2 and later)
                except TypeError:
                    pipeline._exit()  # (psycopg 3.1)
            else:
                pipeline.__exit__(None, None, None)
        except Exception:  # noqa: BLE001 - the error of the write, raised already
            pass
        dbapi_connection._pipeline = None
        if dbapi_connection.pgconn.pipeline_status != 0:  # (still in libpq's pipeline mode)
            dbapi_connection.close()
            return
    if end_transaction and not dbapi_connection.closed and dbapi_connection.pgconn.transaction_status != 0:
        try:
            dbapi_connection.rollback()
        except Exception:  # noqa: BLE001 - unusable: let the pool replace it
            dbapi_connection.close()


def send_together(connection: Any, statements: Sequence[tuple[Any, dict[str, Any]]]) -> None:
    """Execute statements whose answers are not read, in one round trip where
    psycopg can (else one by one). A failure raises as SQLAlchemy's
    ``DBAPIError`` subclass of the driver's error, as an execute would."""
    if len(statements) < 2 or not can_pipeline(connection):
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
