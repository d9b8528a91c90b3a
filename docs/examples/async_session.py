"""AsyncSession (aiosqlite here; asyncpg the same): counters as with Session.

Needs ``pip install countercache[async]`` (aiosqlite, asyncpg, greenlet).
"""

from __future__ import annotations

import asyncio
from typing import Optional

from sqlalchemy import ForeignKey, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    questions: Mapped[list["Question"]] = relationship(back_populates="user")
    question_count: Mapped[int] = counter_cache("questions", strategy="deferred")


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")


async def main() -> None:
    engine = create_async_engine("sqlite+aiosqlite:///async.db")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)

    async with AsyncSession(engine, expire_on_commit=False) as session:
        ada = User()
        session.add_all([ada, Question(user=ada), Question(user=ada)])
        await session.commit()
        # the new value is already loaded: no lazy load (no IO) needed
        print("after commit:", ada.question_count)

        first = await session.scalar(select(Question).where(Question.user_id == ada.id).limit(1))
        await session.delete(first)
        async with session.begin_nested() as savepoint:  # rolled back: not counted
            session.add(Question(user_id=ada.id))
            await session.flush()
            await savepoint.rollback()
        await session.commit()
        print("after delete and a rolled-back savepoint:", ada.question_count)

        # check() and reconcile() are synchronous: run them on the sync side.
        drifts = await session.run_sync(lambda sync_session: countercache.check(sync_session))
        print("drift:", drifts)

        # suspended() takes the AsyncSession too.
        with countercache.suspended(session):
            session.add(Question(user_id=ada.id))
            await session.commit()
        fixed = await session.run_sync(lambda s: countercache.reconcile(s))
        await session.commit()
        print("repaired after a suspended insert:", [(d.pk, d.stored, d.actual) for d in fixed])
    await engine.dispose()


asyncio.run(main())
