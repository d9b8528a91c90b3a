"""A scoped_session (Flask-SQLAlchemy's ``db.session``) and an AsyncSession
wherever a Session is taken: check, reconcile, fold, exact, suspended."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import scoped_session, sessionmaker

import countercache
from helpers import assert_counts
from models import qa


def _drift(engine) -> None:
    """Counters changed behind the ORM's back: every user's set to 7."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET question_count = 7"))


def test_check_and_reconcile_take_a_scoped_session(engine, strategy):
    m = qa(strategy)
    m.Base.metadata.create_all(engine)
    db = scoped_session(sessionmaker(engine))
    try:
        ada = m.User(name="ada")
        db.add_all([ada, m.Question(user=ada), m.Question(user=ada)])
        db.commit()
        assert countercache.check(db) == []
        assert countercache.check(db, m.User.question_count) == []
        db.commit()  # (a new snapshot: MariaDB's REPEATABLE READ sees the drift below)
        if strategy == "sharded":
            assert countercache.fold(db) == 1  # the one shard row, into the column
            db.commit()
        _drift(engine)
        [drift] = countercache.check(db)
        assert (drift.stored, drift.actual) == (7, 2)
        [fixed] = countercache.reconcile(db, m.User.question_count)
        db.commit()
        assert (fixed.pk, fixed.actual) == (ada.id, 2)
        assert ada.question_count == 2
        assert countercache.exact(db, ada, "question_count") == 2
    finally:
        db.remove()
    assert_counts(engine)


def test_suspended_takes_a_scoped_session(engine):
    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    db = scoped_session(sessionmaker(engine))
    try:
        ada = m.User(name="ada")
        db.add(ada)
        db.commit()
        with countercache.suspended(db):
            db.add(m.Question(user=ada))
            db.commit()
        db.refresh(ada)
        assert ada.question_count == 0  # not counted: reconcile() repairs it
        assert [d.actual for d in countercache.reconcile(db)] == [1]
        db.commit()
    finally:
        db.remove()
    assert_counts(engine)


def test_other_binds_refused_by_name(engine):
    qa("bulk").Base.metadata.create_all(engine)
    with pytest.raises(countercache.CounterCacheError, match="or a scoped_session\\), not str"):
        countercache.check("sqlite://")
    with pytest.raises(countercache.CounterCacheError, match="takes a Session, a scoped_session"):
        countercache.exact(engine, object(), "question_count")


@pytest.mark.sqlite_only
def test_async_sessions_outside_run_sync_refused_then_taken_inside(engine):
    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    seen = {}

    async def main():
        async_engine = create_async_engine(engine.url.set(drivername="sqlite+aiosqlite"))
        scoped = async_scoped_session(async_sessionmaker(async_engine, expire_on_commit=False),
                                      scopefunc=asyncio.current_task)
        try:
            session = scoped()
            ada = m.User(name="ada")
            session.add_all([ada, m.Question(user=ada)])
            await session.commit()
            for given in (session, scoped, async_engine):
                with pytest.raises(countercache.CounterCacheError, match=r"run_sync\(countercache.check"):
                    countercache.check(given)
            seen["check"] = await session.run_sync(countercache.check)
            seen["scoped check"] = await session.run_sync(lambda _: countercache.check(scoped))
            seen["exact"] = await session.run_sync(
                lambda _: countercache.exact(session, ada, "question_count"))
            with countercache.suspended(scoped):  # no IO: taken anywhere
                session.add(m.Question(user=ada))
                await session.commit()
            async with AsyncSession(async_engine) as other:
                seen["other"] = await other.run_sync(lambda s: countercache.reconcile(s))
                await other.commit()
            await scoped.remove()
        finally:
            await async_engine.dispose()

    asyncio.run(main())
    assert seen["check"] == seen["scoped check"] == []
    assert seen["exact"] == 1
    assert [(d.stored, d.actual) for d in seen["other"]] == [(1, 2)]
    assert_counts(engine)
