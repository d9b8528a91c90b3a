"""Rollbacks, savepoints and failed flushes (SPEC §4, §5): nothing rolled back stays counted."""

from __future__ import annotations

import pytest
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from helpers import assert_counts, exact_value
from models import qa_seeded


def prepare(engine, strategy):
    """Users a, b with 1 and 0 questions."""
    return qa_seeded(engine, strategy, (1, 0))


def memory_equals_real(s, m, *users):
    """In memory (``sharded``: through ``countercache.exact``, its column lags until a fold)."""
    for user in users:
        assert exact_value(s, user) == m.real(s, user.id), f"user {user.id} wrong in memory"


def test_savepoint_rollback_discards_its_work(engine, strategy):
    m, (a, b) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        ua, ub = s.get(m.User, a), s.get(m.User, b)
        ua.questions.append(m.Question(title="outer before"))
        s.flush()
        nested = s.begin_nested()
        # through the foreign key: the parents stay clean, so SQLAlchemy's own
        # savepoint rollback would not expire them
        s.add_all([m.Question(title="inner", user_id=a), m.Question(title="inner", user_id=b)])
        s.flush()
        assert ua not in s.dirty and ub not in s.dirty
        assert exact_value(s, ua) == (1 if strategy == "deferred" else 3)  # deferred: at commit
        nested.rollback()
        if strategy != "deferred":
            memory_equals_real(s, m, ua, ub)  # expired by the library, read back
        ub.questions.append(m.Question(title="outer after"))
        s.commit()
        memory_equals_real(s, m, ua, ub)
    assert assert_counts(engine) == {a: 2, b: 1}


def test_released_savepoint_counts(engine, strategy):
    m, (a, b) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        ua = s.get(m.User, a)
        with s.begin_nested():
            ua.questions.append(m.Question())
        with s.begin_nested():
            ua.questions.append(m.Question())
            with s.begin_nested() as inner:
                ua.questions.append(m.Question())
                s.flush()
                inner.rollback()
            ua.questions.append(m.Question())
        s.commit()
        memory_equals_real(s, m, ua)
    assert assert_counts(engine) == {a: 4, b: 0}


def test_commit_with_savepoint_still_open(engine, strategy):
    m, (a, b) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        ub = s.get(m.User, b)
        ub.questions.append(m.Question())
        s.begin_nested()
        ub.questions.append(m.Question())
        s.commit()  # releases the savepoint and commits
        memory_equals_real(s, m, ub)
    assert assert_counts(engine) == {a: 1, b: 2}


def test_root_rollback_discards_every_flush(engine, strategy):
    m, (a, b) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        ua = s.get(m.User, a)
        for _ in range(3):
            ua.questions.append(m.Question())
            s.flush()
        s.rollback()
        memory_equals_real(s, m, ua)
        ua.questions.append(m.Question())
        s.commit()
        memory_equals_real(s, m, ua)
    assert assert_counts(engine) == {a: 2, b: 0}


def test_failed_flush_leaves_counters_as_the_rows(engine, strategy):
    m, (a, b) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        ua, ub = s.get(m.User, a), s.get(m.User, b)
        ub.questions.append(m.Question())
        s.flush()  # this one stays in the transaction...
        ua.questions.extend([m.Question(title="x"), m.Question(title="y")])
        ub.questions.append(m.Question(title="invalid"))  # ...this flush fails halfway
        with pytest.raises(DBAPIError):
            s.flush()
        s.rollback()  # the whole transaction goes, the first flush included
        memory_equals_real(s, m, ua, ub)
    assert assert_counts(engine) == {a: 1, b: 0}


def test_failed_flush_inside_savepoint(engine, strategy):
    m, (a, b) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        ua, ub = s.get(m.User, a), s.get(m.User, b)
        ua.questions.append(m.Question())
        s.flush()
        with pytest.raises(DBAPIError):
            with s.begin_nested():
                ub.questions.append(m.Question())
                s.flush()
                ub.questions.append(m.Question(title="invalid"))  # CHECK violation
                s.flush()
        # the savepoint rolled back; the outer transaction goes on
        for q in list(ub.questions):
            if q in s.new:
                s.expunge(q)
        s.expire(ub, ["questions"])
        s.add(m.Question(title="after", user_id=b))
        s.commit()
        memory_equals_real(s, m, ua, ub)
    assert assert_counts(engine) == {a: 2, b: 1}


def test_exception_in_users_before_flush(engine, strategy):
    m, (a, b) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        ua = s.get(m.User, a)
        fail = {"now": False}

        @event.listens_for(s, "before_flush")
        def users_hook(session, flush_context, instances):
            if fail["now"]:
                raise RuntimeError("the application's own check failed")

        ua.questions.append(m.Question())
        s.flush()
        fail["now"] = True
        ua.questions.append(m.Question())
        with pytest.raises(RuntimeError):
            s.flush()
        s.rollback()
        memory_equals_real(s, m, ua)
        fail["now"] = False
        ua.questions.append(m.Question())
        s.commit()
        memory_equals_real(s, m, ua)
    assert assert_counts(engine) == {a: 2, b: 0}


# -- transactions the application controls (issue 16) --------------------------


def test_external_transaction_committed_by_the_connection(engine, strategy):
    """``Session(bind=connection)`` inside ``connection.begin()``: the connection
    commits, never the session. Counters held for the session's commit would be
    lost; they are written at each flush instead."""
    m, (a, b) = prepare(engine, strategy)
    with engine.connect() as conn:
        with conn.begin():
            s = Session(bind=conn)
            s.add(m.Question(title="x", user_id=a))
            s.flush()
            s.add_all([m.Question(title="y", user_id=b), m.Question(title="z", user_id=b)])
            s.flush()
            s.close()
    assert assert_counts(engine) == {a: 2, b: 2}


@pytest.mark.parametrize("mode", ["conditional_savepoint", "create_savepoint", "rollback_only"])
def test_outer_transaction_rolled_back_takes_everything_back(engine, backend, strategy, mode):
    """The test-fixture pattern: an outer transaction on a Connection, a Session
    joined to it that commits (a savepoint, or nothing), and the outer
    transaction rolled back at the end. Inside, the counters are right; after,
    nothing of it remains."""
    m, (a, b) = prepare(engine, strategy)
    with engine.connect() as conn:
        outer = conn.begin()
        s = Session(bind=conn, join_transaction_mode=mode, expire_on_commit=False)
        ua = s.get(m.User, a)
        s.add_all([m.Question(title="x", user_id=a), m.Question(title="y", user_id=b)])
        if mode == "create_savepoint":
            s.commit()
        else:
            s.flush()
        s.add(m.Question(title="z", user_id=a))
        s.flush()
        memory_equals_real(s, m, ua)
        assert exact_value(s, ua) == 3
        s.close()
        outer.rollback()
    counts = assert_counts(engine)  # exact whatever stayed
    if not (backend == "sqlite" and mode == "create_savepoint"):
        # (pysqlite emits no BEGIN: SQLite's RELEASE of the outermost SAVEPOINT commits)
        assert counts == {a: 1, b: 0}


def test_autocommit_engine_keeps_every_flush(engine, strategy):
    """``isolation_level="AUTOCOMMIT"``: each statement commits by itself, so a
    flush's rows stay even when the session never commits; so do its counts."""
    m, (a, b) = prepare(engine, strategy)
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    with Session(auto) as s:
        s.add_all([m.Question(title="x", user_id=a), m.Question(title="y", user_id=b)])
        s.flush()
        s.delete(s.get(m.Question, s.scalars(m.Question.__table__.select().where(
            m.Question.user_id == a).order_by(m.Question.id).limit(1)).first()))
        s.flush()
        s.rollback()  # nothing to take back: AUTOCOMMIT committed each statement
    assert assert_counts(engine) == {a: 1, b: 1}
