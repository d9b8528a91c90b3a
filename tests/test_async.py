"""AsyncSession with aiosqlite and asyncpg (SPEC §4): the same guarantees as Session."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import countercache
from helpers import assert_counts, orm_kept_only
from models import qa

pytestmark = pytest.mark.sqlite_postgresql_only

ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


def run(engine, backend, body):
    url = engine.url.set(drivername=ASYNC_DRIVERS[backend])

    async def main():
        async_engine = create_async_engine(url)
        try:
            await body(async_engine)
        finally:
            await async_engine.dispose()

    asyncio.run(main())


async def counts(s, strategy, *users):
    """The users' counters: in memory, with no IO; ``sharded`` (whose column
    lags until a fold) through ``countercache.exact``."""
    if strategy == "sharded":
        return await s.run_sync(lambda sync: tuple(countercache.exact(sync, u, "question_count") for u in users))
    return tuple(u.question_count for u in users)


def test_add_delete_move_and_savepoint(engine, backend, strategy):
    m = qa(strategy, cascade="all, delete-orphan")
    m.Base.metadata.create_all(engine)
    seen = {}

    async def body(async_engine):
        async with AsyncSession(async_engine, expire_on_commit=False) as s:
            a, b = m.User(name="a"), m.User(name="b")
            s.add_all([a, b, m.Question(user=a), m.Question(user=a), m.Question(user=b)])
            await s.flush()
            if strategy != "deferred":
                seen["after flush"] = await counts(s, strategy, a, b)  # no IO needed
            await s.commit()
            seen["after commit"] = await counts(s, strategy, a, b)

            questions = (await s.scalars(select(m.Question).where(m.Question.user_id == a.id))).all()
            questions[0].user = b
            await s.delete(questions[1])
            async with s.begin_nested() as nested:
                s.add(m.Question(user_id=a.id))
                await s.flush()
                await nested.rollback()
            await s.commit()
            await s.refresh(a)
            await s.refresh(b)
            seen["end"] = await counts(s, strategy, a, b)

    run(engine, backend, body)
    if strategy != "deferred":
        assert seen["after flush"] == (2, 1)
    assert seen["after commit"] == (2, 1)
    assert seen["end"] == (0, 2)
    assert sorted(assert_counts(engine).values()) == [0, 2]


def test_suspended_async(engine, backend, strategy):
    orm_kept_only(strategy, "suspended() cannot suspend the database's triggers: they count inside it")
    m = qa(strategy)
    m.Base.metadata.create_all(engine)

    async def body(async_engine):
        async with AsyncSession(async_engine, expire_on_commit=False) as s:
            user = m.User(name="a")
            s.add(user)
            await s.commit()
            with countercache.suspended(s):
                s.add(m.Question(user_id=user.id))
                await s.commit()

    run(engine, backend, body)
    with engine.connect() as conn:
        from sqlalchemy import text

        assert conn.execute(text("SELECT question_count FROM users")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM questions")).scalar() == 1


def test_sharded_async(engine, backend):
    m = qa("sharded", cascade="all, delete-orphan")
    m.Base.metadata.create_all(engine)
    seen = {}

    async def body(async_engine):
        async with AsyncSession(async_engine, expire_on_commit=False) as s:
            a, b = m.User(name="a"), m.User(name="b")
            s.add_all([a, b, m.Question(user=a), m.Question(user=a), m.Question(user=b)])
            await s.commit()
            questions = (await s.scalars(select(m.Question).where(m.Question.user_id == a.id))).all()
            questions[0].user = b
            await s.delete(questions[1])
            async with s.begin_nested() as nested:
                s.add(m.Question(user_id=a.id))
                await s.flush()
                await nested.rollback()
            await s.commit()
            seen["exact"] = await s.run_sync(
                lambda sync: tuple(countercache.exact(sync, u, "question_count") for u in (a, b)))
            seen["column"] = (a.question_count, b.question_count)  # lags until fold
            await s.commit()
            seen["folded"] = await s.run_sync(lambda sync: countercache.fold(sync))
            await s.commit()
            await s.refresh(a)
            await s.refresh(b)
            seen["end"] = (a.question_count, b.question_count)

    run(engine, backend, body)
    assert seen["exact"] == (0, 2)
    assert seen["column"] == (0, 0)
    assert seen["folded"] >= 2
    assert seen["end"] == (0, 2)
    assert sorted(assert_counts(engine).values()) == [0, 2]


def test_a_savepoint_rolled_back_inside_its_context_then_a_keeping_commit(engine, backend, strategy):
    """``async with begin_nested()``, rolled back inside it, then the commit
    with ``expire_on_commit=False``: the counter is read back at the commit, not
    lazily after it (outside tester: MissingGreenlet), nor at the rollback
    (where nothing may run inside the context)."""
    m = qa(strategy)
    m.Base.metadata.create_all(engine)
    seen = {}

    async def body(async_engine):
        async with AsyncSession(async_engine, expire_on_commit=False) as s:
            a = m.User(name="a")
            s.add(a)
            await s.commit()
            s.add(m.Question(user_id=a.id))
            await s.flush()
            async with s.begin_nested() as nested:
                s.add(m.Question(user_id=a.id))
                await s.flush()
                await nested.rollback()
            await s.commit()
            seen["after commit"] = await counts(s, strategy, a)

    run(engine, backend, body)
    assert seen["after commit"] == (1,)
    assert_counts(engine)


def test_a_rolled_back_savepoint_leaves_the_counter_readable_without_io(engine, backend, strategy):
    """After ``await nested.rollback()`` the counter shows again what it showed before
    the savepoint, readable with no lazy load (an expired one raised ``MissingGreenlet``;
    found by an outside tester)."""
    m = qa(strategy)
    m.Base.metadata.create_all(engine)
    seen = {}

    async def body(async_engine):
        async with AsyncSession(async_engine, expire_on_commit=False) as s:
            a = m.User(name="a")
            s.add_all([a, m.Question(user=a)])
            await s.commit()
            seen["before"] = await counts(s, strategy, a)
            async with s.begin_nested() as nested:
                s.add(m.Question(user_id=a.id))
                await s.flush()
                await nested.rollback()
            seen["after rollback"] = await counts(s, strategy, a)  # (no IO: raises MissingGreenlet if expired)
            s.add(m.Question(user_id=a.id))
            await s.commit()
            seen["after commit"] = await counts(s, strategy, a)

    run(engine, backend, body)
    assert seen["before"] == seen["after rollback"] == (1,)
    assert seen["after commit"] == (2,)
    assert_counts(engine)
