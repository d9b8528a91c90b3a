"""Keys as applications pass them (issue 15): a foreign key from a web form is
a string (``q.user_id = "3"`` on an integer column, a UUID key as text).
Plain SQLAlchemy commits it; the counters group, sort and write such keys as
the database stores them, and the parent in memory shows its count.
"""

from __future__ import annotations

import enum
import uuid
from types import SimpleNamespace
from typing import Optional

import pytest
from sqlalchemy import Enum, ForeignKey, Integer, Uuid, insert, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache
from helpers import assert_counts, exact_value


def models(strategy: str, key_type: type = int) -> SimpleNamespace:
    uuid_keys = key_type is uuid.UUID

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id = mapped_column(Uuid if uuid_keys else Integer, primary_key=True, autoincrement=False)
        questions: Mapped[list["Question"]] = relationship(back_populates="user")
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)
        answer_count: Mapped[int] = counter_cache("questions.answers", strategy=strategy)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id = mapped_column(Uuid if uuid_keys else Integer, ForeignKey("users.id"), nullable=True)
        user: Mapped[Optional[User]] = relationship(back_populates="questions")
        answers: Mapped[list["Answer"]] = relationship(back_populates="question")

    class Answer(Base):
        __tablename__ = "answers"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        question_id: Mapped[Optional[int]] = mapped_column(ForeignKey("questions.id"))
        question: Mapped[Optional[Question]] = relationship(back_populates="answers")

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    return SimpleNamespace(Base=Base, User=User, Question=Question, Answer=Answer)


def answers_exact(engine) -> None:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT u.answer_count, (SELECT count(*) FROM answers a JOIN questions q ON a.question_id = q.id "
            "WHERE q.user_id = u.id) FROM users u")).all()
    assert all(stored == actual for stored, actual in rows), rows


def test_integer_keys_given_as_strings(engine, strategy):
    m = models(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([m.User(id=1), m.User(id=2), m.User(id=3)])
        s.commit()
    with Session(engine, expire_on_commit=False) as s:
        users = [s.get(m.User, i) for i in (1, 2, 3)]
        s.add_all([m.Question(id=1, user_id="3"), m.Question(id=2, user_id=3), m.Question(id=3, user_id="1"),
                   m.Question(id=4, user_id=2)])
        s.flush()
        s.add_all([m.Answer(id=10, question_id="1"), m.Answer(id=11, question_id=1),
                   m.Answer(id=12, question_id="3")])
        s.flush()
        if strategy in ("bulk", "per_row"):
            assert [u.question_count for u in users] == [1, 1, 2]
        assert [countercache.exact(s, u, "question_count") for u in users] == [1, 1, 2]
        s.get(m.Question, 1).user_id = "2"  # moved (a form posts it back as text)
        s.get(m.Question, 2).user_id = "3"  # the same value, as text: no move
        s.execute(insert(m.Question), [{"id": 5, "user_id": "1"}, {"id": 6, "user_id": "3"}])
        s.commit()
        assert [exact_value(s, u, "question_count") for u in users] == [2, 2, 2]  # (committed)
    assert assert_counts(engine) == {1: 2, 2: 2, 3: 2}
    answers_exact(engine)


@pytest.mark.postgresql_only  # (elsewhere SQLAlchemy's Uuid type itself takes only UUID objects)
@pytest.mark.parametrize("strategy", ["bulk", "per_row", "deferred"])  # (sharded: integer or string keys)
def test_uuid_keys_given_as_strings(engine, strategy):
    m = models(strategy, uuid.UUID)
    m.Base.metadata.create_all(engine)
    a, b = uuid.UUID(int=1), uuid.UUID(int=2)
    with Session(engine) as s:
        s.add_all([m.User(id=a), m.User(id=b)])
        s.commit()
    with Session(engine) as s:
        s.add_all([m.Question(id=1, user_id=str(a)), m.Question(id=2, user_id=a), m.Question(id=3, user_id=str(b))])
        s.commit()
        s.get(m.Question, 2).user_id = str(b)
        s.commit()
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT u.question_count, (SELECT count(*) FROM questions q WHERE q.user_id = u.id) FROM users u")).all()
    assert sorted(rows) == [(1, 1), (2, 2)]


class Status(enum.Enum):
    open = "o"
    closed = "c"


def test_where_on_an_enum_column_counts_members_and_strings_as_sql_does(engine, strategy):
    """``where=Question.status == "open"`` on an ``Enum(PyEnum)`` column: the flush
    compares as the database does (the member, or its name as a string), so
    it agrees with ``check()``."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        by_name: Mapped[int] = counter_cache("questions", strategy=strategy, where=lambda: Question.status == "open")
        by_member: Mapped[int] = counter_cache("questions", strategy=strategy,
                                               where=lambda: Question.status == Status.open)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        status: Mapped[Status] = mapped_column(Enum(Status), default=Status.open)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1))
        s.flush()
        s.add_all([Question(id=1, user_id=1), Question(id=2, user_id=1, status=Status.closed),
                   Question(id=3, user_id=1, status="open"), Question(id=4, user_id=1, status="closed")])
        s.commit()
        s.get(Question, 2).status = Status.open
        s.get(Question, 3).status = "closed"
        s.commit()
    assert countercache.check(engine) == []
    if strategy == "sharded":
        countercache.fold(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT by_name, by_member FROM users")).one() == (2, 2)
