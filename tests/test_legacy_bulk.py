"""The legacy bulk methods (``Session.bulk_insert_mappings()``,
``bulk_update_mappings()``, ``bulk_save_objects()``) run no ORM event a
counter could be kept by: what they would change in a count is refused at
the call, before anything is written, naming the counters and the ORM
statement that does the same and is counted; what changes no count goes on."""

from __future__ import annotations

from typing import Optional

import pytest
from sqlalchemy import ForeignKey, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache
from helpers import orm_kept_only


def models(strategy):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20), default="")
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)
        open_count: Mapped[int] = counter_cache("questions", strategy=strategy,
                                                where=lambda: Question.status == "open")
        score_total: Mapped[int] = counter_cache("questions", strategy=strategy, sum="score")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(20), default="")
        status: Mapped[str] = mapped_column(String(10), default="open")
        score: Mapped[int] = mapped_column(default=1)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20), default="")

    return Base, User, Question, Tag


@pytest.fixture
def m(engine, strategy):
    Base, User, Question, Tag = models(strategy)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=1), User(id=2)])
        s.flush()
        s.add_all([Question(id=i, user_id=1 if i < 3 else 2) for i in (1, 2, 3)])
        s.commit()
    return User, Question, Tag


def exact(engine):
    """Every counter against an independent recount, and the question count."""
    countercache.fold(engine)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT u.id, u.question_count, u.open_count, u.score_total,"
            " (SELECT count(*) FROM questions q WHERE q.user_id = u.id),"
            " (SELECT count(*) FROM questions q WHERE q.user_id = u.id AND q.status = 'open'),"
            " (SELECT coalesce(sum(q.score), 0) FROM questions q WHERE q.user_id = u.id)"
            " FROM users u ORDER BY u.id")).all()
        total = conn.scalar(text("SELECT count(*) FROM questions"))
    assert all(tuple(r[1:4]) == tuple(r[4:7]) for r in rows), rows
    return total


INSERT = r"User\.open_count, User\.question_count, User\.score_total: Session\.{}\(\) inserts Question rows.*session\.execute\(insert\(Question\)"
UPDATE = r"User\.open_count, User\.question_count, User\.score_total: Session\.{}\(.*sets Question\.{}.*session\.execute\(update\(Question\)"


@pytest.mark.parametrize("kw", [{}, {"return_defaults": True}, {"render_nulls": True}])
def test_insert_mappings_of_counted_rows_refused(strategy, engine, m, statements, kw):
    orm_kept_only(strategy, "the database counts the rows of the legacy bulk methods: nothing to refuse")
    User, Question, Tag = m
    with Session(engine) as s:
        s.add(Question(id=10, user_id=2))
        s.flush()
        with statements.record() as rec, pytest.raises(countercache.CounterCacheError,
                                                       match=INSERT.format("bulk_insert_mappings")):
            s.bulk_insert_mappings(Question, [{"id": 11, "user_id": 1}, {"id": 12, "user_id": None}], **kw)
        assert rec.sql() == []  # nothing written
        s.bulk_insert_mappings(Tag, [{"name": "not counted"}], **kw)  # the session goes on
        s.commit()
    assert exact(engine) == 4


@pytest.mark.parametrize("key, value", [("user_id", 2), ("status", "closed"), ("score", 5)])
def test_update_mappings_of_counted_values_refused(strategy, engine, m, statements, key, value):
    orm_kept_only(strategy, "the database counts the rows of the legacy bulk methods: nothing to refuse")
    User, Question, Tag = m
    with Session(engine) as s:
        with statements.record() as rec, pytest.raises(countercache.CounterCacheError,
                                                       match=UPDATE.format("bulk_update_mappings", key)):
            s.bulk_update_mappings(Question, [{"id": 1, "title": "x"}, {"id": 2, key: value}])
        assert rec.sql() == []
        s.bulk_update_mappings(Question, [{"id": 1, "title": "renamed"}])  # no counted value: goes on
        s.commit()
        assert s.scalar(select(Question.title).where(Question.id == 1)) == "renamed"
    assert exact(engine) == 3


def test_save_objects_refused_before_any_group_is_written(strategy, engine, m, statements):
    """New questions after a new user in one call: refused at the first
    group, before the user is inserted."""
    orm_kept_only(strategy, "the database counts the rows of the legacy bulk methods: nothing to refuse")
    User, Question, Tag = m
    with Session(engine) as s:
        with statements.record() as rec, pytest.raises(countercache.CounterCacheError,
                                                       match=INSERT.format("bulk_save_objects")):
            s.bulk_save_objects([User(id=5), Tag(name="t"), Question(id=20, user_id=5)])
        assert rec.sql() == []
        s.commit()
        assert s.scalar(select(func.count()).select_from(User)) == 2
    assert exact(engine) == 3


@pytest.mark.parametrize("preserve_order", [True, False])
def test_save_objects_of_changed_counted_values_refused(strategy, engine, m, preserve_order):
    orm_kept_only(strategy, "the database counts the rows of the legacy bulk methods: nothing to refuse")
    User, Question, Tag = m
    with Session(engine) as s:
        first, second = s.get(Question, 1), s.get(Question, 2)
        first.title = "renamed"
        second.user_id = 2
        with pytest.raises(countercache.CounterCacheError, match=UPDATE.format("bulk_save_objects", "user_id")):
            s.bulk_save_objects([Tag(name="t"), first, second], preserve_order=preserve_order)
        s.rollback()
        first = s.get(Question, 1)
        first.title = "renamed"
        s.bulk_save_objects([first, User(id=3)], preserve_order=preserve_order)  # nothing counted changes
        s.commit()
        assert s.scalar(select(Question.title).where(Question.id == 1)) == "renamed"
    assert exact(engine) == 3


def test_save_objects_without_update_changed_only_refused(strategy, engine, m):
    """update_changed_only=False writes every loaded value: a loaded foreign
    key written back may move a row another transaction moved since."""
    orm_kept_only(strategy, "the database counts the rows of the legacy bulk methods: nothing to refuse")
    User, Question, Tag = m
    with Session(engine) as s:
        question = s.get(Question, 1)
        question.title = "renamed"
        with pytest.raises(countercache.CounterCacheError,
                           match=r"update_changed_only=False\) \(it writes every loaded value\) sets Question\.score"):
            s.bulk_save_objects([question], update_changed_only=False)
    assert exact(engine) == 3


def test_one_pass_iterators_of_counted_rows_refused(strategy, engine, m, statements):
    orm_kept_only(strategy, "the database counts the rows of the legacy bulk methods: nothing to refuse")
    User, Question, Tag = m
    with Session(engine) as s:
        with statements.record() as rec:
            with pytest.raises(countercache.CounterCacheError, match=r"User\.open_count.*one-pass iterator.*pass a list"):
                s.bulk_update_mappings(Question, ({"id": i, "title": "x"} for i in (1, 2)))
            with pytest.raises(countercache.CounterCacheError, match=INSERT.format("bulk_insert_mappings")):
                s.bulk_insert_mappings(Question, iter([{"id": 9, "user_id": 1}]))
            with pytest.raises(countercache.CounterCacheError, match=r"User\.question_count.*one-pass iterator"):
                s.bulk_insert_mappings(User, iter([{"id": 9}]))  # (it might set a counter)
        assert rec.sql() == []
        s.bulk_insert_mappings(Tag, iter([{"name": "a"}]))  # nothing counted: as without countercache
        s.bulk_save_objects(iter([Tag(name="b")]))
        s.commit()
        assert s.scalar(select(func.count()).select_from(Tag)) == 2
    assert exact(engine) == 3


def test_suspended_lets_them_through_uncounted(strategy, engine, m):
    """suspended(): as documented, not counted, and reconcile() repairs."""
    orm_kept_only(strategy, "suspended() cannot suspend the database's triggers: they count inside it")
    User, Question, Tag = m
    with Session(engine) as s:
        with countercache.suspended(s):
            s.bulk_insert_mappings(Question, [{"id": 30, "user_id": 2}])
            s.bulk_update_mappings(Question, [{"id": 1, "user_id": 2}])
        s.commit()
    drifted = countercache.check(engine)
    assert {(d.counter.key, d.pk) for d in drifted} >= {("question_count", 1), ("question_count", 2)}
    countercache.reconcile(engine)
    assert exact(engine) == 4
