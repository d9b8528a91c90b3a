"""Quickstart: a counter column kept exact on SQLite.

Run it anywhere with ``python quickstart.py`` (needs only ``pip install
countercache``); it uses an in-memory SQLite database.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from countercache import CounterCacheError, counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    questions: Mapped[list["Question"]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )
    # An Integer NOT NULL DEFAULT 0 column that the library keeps equal to
    # the number of this user's questions.
    question_count: Mapped[int] = counter_cache("questions")


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")


engine = create_engine("sqlite://")
Base.metadata.create_all(engine)

with Session(engine) as session:
    ada, grace = User(name="ada"), User(name="grace")
    # Parents and children pending in the same flush: fine.
    session.add_all([
        Question(title="What is a flush?", user=ada),
        Question(title="Why a counter column?", user=ada),
        Question(title="Who locks first?", user=grace),
    ])
    session.commit()
    print("after adding:", ada.question_count, grace.question_count)

    # Move a question (by relationship or by foreign key), delete another.
    first, second = ada.questions
    first.user = grace
    session.delete(second)
    session.flush()
    # Right in memory after the flush, without refresh().
    print("after moving and deleting:", ada.question_count, grace.question_count)
    session.commit()

    # Through the parent's collection, by foreign key, and a delete-orphan.
    ada.questions.append(Question(title="Is it exact?"))
    session.add(Question(title="By foreign key", user_id=ada.id))
    grace.questions.pop()
    session.commit()
    print("after the collection changes:", ada.question_count, grace.question_count)

    # A rollback takes its changes back, in the database and in memory.
    session.add(Question(title="never mind", user=grace))
    session.flush()
    session.rollback()
    print("after a rollback:", ada.question_count, grace.question_count)

    # The column belongs to the library.
    try:
        ada.question_count = 42
    except CounterCacheError as exc:
        print("refused:", exc)

    # Every counter equals the real count in the database.
    real = dict(session.execute(
        select(User.name, func.count(Question.id)).outerjoin(Question).group_by(User.name)
    ).all())
    stored = dict(session.execute(select(User.name, User.question_count)).all())
    print("stored:", stored, "real:", real)
    assert stored == real
