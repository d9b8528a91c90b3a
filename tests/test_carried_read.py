"""The locking pre-read of a flush's DELETE sent with the DELETE (psycopg 3, PostgreSQL).

A flush that deletes loaded rows must read and lock them first: another
transaction may have moved them since they were loaded. On psycopg 3 that
read waits for the connection's next statement (the DELETE) and goes in
pipeline mode with it: both run in order, in one round trip. These tests
check the round trips (the benchmark's proxy counts them), that the read
still sees what the database holds, and that a failure leaves nothing
waiting on the connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from test_riding import counted, models, normal, proxy, round_trips, through_proxy  # noqa: F401 - fixtures

pytestmark = pytest.mark.postgresql_only  # (psycopg 3)


def _loaded(engine: sa.Engine, Like: Any, n: int, post_id: int = 1) -> list[Any]:
    with Session(engine) as session:
        session.add_all([Like(post_id=post_id) for _ in range(n)])
        session.commit()
    with Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(sa.select(Like).where(Like.post_id == post_id).order_by(Like.id)))


@contextmanager
def row_locked_elsewhere(engine: sa.Engine, like: Any) -> Iterator[Session]:
    """A session that deletes ``like``, whose row another transaction holds locked
    (``FOR UPDATE``); its lock waits time out after 100 ms."""
    with engine.connect() as locker:
        locker.execute(sa.text("SELECT 1 FROM ride_likes WHERE id = :i FOR UPDATE"), {"i": like.id})
        with Session(engine) as session:
            session.execute(sa.text("SET LOCAL lock_timeout = '100ms'"))
            session.delete(session.merge(like, load=False))
            yield session
        locker.rollback()


@pytest.mark.parametrize("strategy", ["deferred", "sharded", "bulk"])
def test_a_delete_costs_the_round_trips_of_no_counter(proxy, through_proxy, models, strategy):  # noqa: F811
    """deferred, sharded: BEGIN, DELETE (with its read), the write with the COMMIT: as many
    round trips as without a counter. bulk writes at the flush: one more."""
    found = {}
    for kind in (None, strategy):
        _, _, Like = models(kind)
        it = iter(_loaded(through_proxy, Like, 12))

        def delete() -> None:
            with Session(through_proxy) as session:
                session.delete(session.merge(next(it), load=False))
                session.commit()

        found[kind] = round_trips(proxy, through_proxy, delete, times=3, warm=6)
        if kind is not None:
            assert counted(through_proxy) == (3, 3)
    assert found[None] == 3, found
    assert found[strategy] == found[None] + (strategy == "bulk"), found


@pytest.mark.parametrize("strategy", ["deferred", "sharded", "bulk"])
def test_the_read_sees_a_row_moved_since_it_was_loaded(through_proxy, models, strategy):  # noqa: F811
    """Loaded under post 1, moved to post 2 by another transaction, then deleted (two of them,
    in one flush): post 2 loses them, post 1 keeps its count."""
    _, _, Like = models(strategy)
    stale = _loaded(through_proxy, Like, 4)
    with Session(through_proxy) as other:
        for like in other.scalars(sa.select(Like).where(Like.id.in_([stale[0].id, stale[1].id]))):
            like.post_id = 2
        other.commit()
    with Session(through_proxy) as session:
        for like in stale[:3]:
            session.delete(session.merge(like, load=False))
        session.commit()
    assert counted(through_proxy, 1) == (1, 1)
    assert counted(through_proxy, 2) == (0, 0)


def test_a_failed_read_fails_the_flush_and_leaves_nothing_waiting(through_proxy, models):  # noqa: F811
    """The row is locked by another transaction and the lock wait times out: the flush
    fails with the driver's error, as SQLAlchemy raises it; the connection is normal again
    and the next transaction on it counts right."""
    _, _, Like = models("sharded")
    likes = _loaded(through_proxy, Like, 3)
    with row_locked_elsewhere(through_proxy, likes[0]) as session:
        with pytest.raises(DBAPIError, match="lock"):
            session.commit()
        session.rollback()
        assert normal(session.connection().connection.dbapi_connection)
    with Session(through_proxy) as session:
        session.delete(session.merge(likes[1], load=False))
        session.commit()
    assert counted(through_proxy) == (2, 2)


def test_a_flush_failing_before_its_delete_leaves_nothing_waiting(through_proxy, models):  # noqa: F811
    """An application's ``before_delete`` listener raises after the read was set to wait: the
    connection's cursors are psycopg's own again, and nothing runs later in its place."""
    _, _, Like = models("deferred")
    likes = _loaded(through_proxy, Like, 3)

    def refuse(mapper: Any, connection: Any, target: Any) -> None:
        raise RuntimeError("not this one")

    event.listen(Like, "before_delete", refuse)
    try:
        with Session(through_proxy) as session:
            session.delete(session.merge(likes[0], load=False))
            with pytest.raises(RuntimeError, match="not this one"):
                session.flush()
            session.rollback()
            dbapi_connection = session.connection().connection.dbapi_connection
            assert normal(dbapi_connection), dbapi_connection.cursor_factory
    finally:
        event.remove(Like, "before_delete", refuse)
    assert counted(through_proxy) == (3, 3)


def test_with_an_application_before_delete_listener_the_read_runs_at_once(through_proxy, models):  # noqa: F811
    """An application's ``before_delete`` listener may run statements of its own before the
    DELETE: the read then runs at once, as a statement of its own (before them), and the
    listener's statements answer as usual."""
    _, _, Like = models("sharded")
    likes = _loaded(through_proxy, Like, 3)
    answers: list[int] = []

    def audit(mapper: Any, connection: Any, target: Any) -> None:
        answers.append(connection.execute(sa.text("SELECT count(*) FROM ride_likes")).scalar_one())

    event.listen(Like, "before_delete", audit)
    try:
        with Session(through_proxy) as session:
            session.delete(session.merge(likes[0], load=False))
            session.delete(session.merge(likes[1], load=False))
            session.commit()
    finally:
        event.remove(Like, "before_delete", audit)
    assert answers == [3, 3]
    assert counted(through_proxy) == (1, 1)


@pytest.mark.parametrize("strategy", ["deferred", "sharded", "bulk"])
def test_a_listener_statement_that_fails_before_it_is_sent_loses_no_count(through_proxy, models, strategy):  # noqa: F811
    """A best-effort statement of the application's, refused by psycopg before anything is
    sent (a NUL character in a text value) and caught: the read is not lost with it."""
    _, _, Like = models(strategy)
    likes = _loaded(through_proxy, Like, 5)

    def audit(mapper: Any, connection: Any, target: Any) -> None:
        try:
            connection.execute(sa.text("SELECT :note"), {"note": "a\x00b"})
        except (DBAPIError, ValueError):
            pass

    event.listen(Like, "before_delete", audit)
    try:
        with Session(through_proxy) as session:
            for like in likes[:2]:
                session.delete(session.merge(like, load=False))
            session.commit()
    finally:
        event.remove(Like, "before_delete", audit)
    assert counted(through_proxy) == (3, 3)


def test_a_listener_may_still_send_several_statements_in_one_string(through_proxy, models):  # noqa: F811
    """Pipeline mode takes one statement per string: a listener's ``SET ...; SET ...``
    (the simple protocol) must not be sent in one with the read."""
    _, _, Like = models("deferred")
    likes = _loaded(through_proxy, Like, 4)

    def settings(mapper: Any, connection: Any, target: Any) -> None:
        connection.exec_driver_sql("SET LOCAL application_name = 'a'; SET LOCAL work_mem = '8MB'")

    event.listen(Like, "before_delete", settings)
    try:
        with Session(through_proxy) as session:
            session.delete(session.merge(likes[0], load=False))
            session.commit()
    finally:
        event.remove(Like, "before_delete", settings)
    assert counted(through_proxy) == (3, 3)


def test_a_failed_read_is_the_flush_error_not_a_listener_statement_error(through_proxy, models):  # noqa: F811
    """With an application's listener that swallows errors of its own statements, a lock
    wait that times out still fails the flush as the read's error (the lock), not later as
    an aborted transaction."""
    _, _, Like = models("sharded")
    likes = _loaded(through_proxy, Like, 2)

    def careful(mapper: Any, connection: Any, target: Any) -> None:
        try:
            connection.execute(sa.text("SELECT 1"))
        except DBAPIError:
            pass

    event.listen(Like, "before_delete", careful)
    try:
        with row_locked_elsewhere(through_proxy, likes[0]) as session:
            with pytest.raises(DBAPIError, match="lock timeout"):
                session.flush()
            session.rollback()
    finally:
        event.remove(Like, "before_delete", careful)
    assert counted(through_proxy) == (2, 2)


def test_a_waiting_read_runs_alone_before_any_statement_but_a_delete(through_proxy, models):  # noqa: F811
    """The driver level: a read set to wait goes in one pipeline with a DELETE; before any
    other statement (here two in one string, which a pipeline refuses) it runs first, on its
    own; either way its rows reach the callback before the statement's answer is read."""
    import psycopg

    from countercache import _psycopg

    _, _, Like = models("deferred")
    _loaded(through_proxy, Like, 2)
    with through_proxy.connect() as connection:
        dbapi_connection = connection.connection.dbapi_connection
        connection.execute(sa.text("SELECT 1"))  # (in a transaction)
        got: list[Any] = []
        assert _psycopg.carry(dbapi_connection, "SELECT count(*) FROM ride_likes", None, got.append)
        assert dbapi_connection.cursor_factory is not psycopg.Cursor
        cursor = dbapi_connection.cursor()
        cursor.execute("SET LOCAL work_mem = '8MB'; SELECT 7")
        assert got == [[(2,)]] and cursor.nextset() and cursor.fetchall() == [(7,)]
        assert normal(dbapi_connection)
        got.clear()
        assert _psycopg.carry(dbapi_connection, "SELECT count(*) FROM ride_likes", None, got.append)
        cursor = dbapi_connection.cursor()
        cursor.execute("DELETE FROM ride_likes WHERE id = (SELECT min(id) FROM ride_likes)")
        assert got == [[(2,)]] and cursor.rowcount == 1
        assert normal(dbapi_connection)
        connection.rollback()
