"""The shape of a FastAPI application: an AsyncSession per request, counters read after commit.

Each endpoint gets its session from a dependency (``get_session``) built on
``async_sessionmaker``, as FastAPI's ``Depends(get_session)`` gives it;
``request()`` below does what FastAPI does per request, so that this script
runs without a server. Needs ``pip install countercache[async]``.
Run as ``python fastapi_async.py [ASYNC_DATABASE_URL]`` (default: aiosqlite in memory).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any, Optional

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.pool import StaticPool

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    questions: Mapped[list["Question"]] = relationship(back_populates="user")
    question_count: Mapped[int] = counter_cache("questions")


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")


URL = sys.argv[1] if len(sys.argv) > 1 else "sqlite+aiosqlite://"
engine = create_async_engine(URL, **({"poolclass": StaticPool} if URL == "sqlite+aiosqlite://" else {}))
# expire_on_commit=False: what the endpoint returns after commit is read
# without a lazy load (which an AsyncSession cannot do implicitly)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def get_session() -> AsyncIterator[AsyncSession]:
    """The dependency: ``session: Annotated[AsyncSession, Depends(get_session)]``."""
    async with SessionLocal() as session:
        yield session


# -- endpoints (``@app.post("/users")`` and so on in a FastAPI application) --


async def create_user(name: str, session: AsyncSession) -> dict[str, Any]:
    user = User(name=name)
    session.add(user)
    await session.commit()
    return {"id": user.id, "question_count": user.question_count}


async def ask(user_id: int, titles: list[str], session: AsyncSession) -> dict[str, Any]:
    user = await session.get(User, user_id)
    session.add_all([Question(title=title, user=user) for title in titles])
    await session.commit()
    return {"question_count": user.question_count}  # already the new value: no IO


async def delete_questions(user_id: int, titles: list[str], session: AsyncSession) -> dict[str, Any]:
    questions = await session.scalars(
        select(Question).where(Question.user_id == user_id, Question.title.in_(titles)))
    for question in questions:
        await session.delete(question)
    await session.commit()
    user = await session.get(User, user_id)  # a fresh row: its counter is up to date
    return {"question_count": user.question_count}


async def move_question(question_id: int, to_user_id: int, session: AsyncSession) -> dict[str, Any]:
    question = await session.get(Question, question_id)
    old_user_id = question.user_id
    question.user_id = to_user_id
    await session.commit()
    moved = select(User).where(User.id.in_([old_user_id, to_user_id])).order_by(User.id)
    users = (await session.scalars(moved)).all()
    return {u.name: u.question_count for u in users}


async def counters_health(session: AsyncSession) -> dict[str, Any]:
    drifts = await session.run_sync(countercache.check)  # check() is synchronous: run_sync
    return {"drift": [(d.name, d.pk, d.stored, d.actual) for d in drifts]}


async def request(endpoint: Any, **params: Any) -> Any:
    """What FastAPI does for one request: the dependency's session, the endpoint, the cleanup."""
    dependency = get_session()
    session = await anext(dependency)
    try:
        return await endpoint(session=session, **params)
    finally:
        await dependency.aclose()


async def main() -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    ada = await request(create_user, name="ada")
    bob = await request(create_user, name="bob")
    print("created:", ada, bob)
    print("ada asks:", await request(ask, user_id=ada["id"], titles=["Why?", "How?", "When?"]))
    print("bob asks:", await request(ask, user_id=bob["id"], titles=["Where?"]))
    print("ada deletes:", await request(delete_questions, user_id=ada["id"], titles=["How?"]))
    async with SessionLocal() as session:
        when = await session.scalar(select(Question.id).where(Question.title == "When?"))
    print("moved:", await request(move_question, question_id=when, to_user_id=bob["id"]))
    print("health:", await request(counters_health))
    await engine.dispose()


asyncio.run(main())
