"""ORM-enabled bulk statements through the session (SPEC §4): counted exactly,
the user's result unchanged, other columns' updates at no extra cost."""

from __future__ import annotations

import threading
import time
from typing import Optional

import pytest
from sqlalchemy import ForeignKey, String, bindparam, delete, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from helpers import assert_counts, exact_value, orm_kept_only
from models import qa_seeded


def prepare(engine, strategy):
    """Users a, b, c with 3, 2 and 0 questions (titled q0, q1, ...)."""
    return qa_seeded(engine, strategy, (3, 2, 0))


def loaded(s, m, ids):
    return [s.get(m.User, i) for i in ids]


def values(s, users):
    """The users' counters (``sharded``: through ``countercache.exact``, the column lags)."""
    return [exact_value(s, u) for u in users]


def test_insert_list_of_dicts(engine, strategy):
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        users = loaded(s, m, (a, b, c))
        s.execute(insert(m.Question), [{"user_id": a}, {"user_id": c}, {"user_id": c}, {"title": "orphan"}])
        ids = s.scalars(insert(m.Question).returning(m.Question.id), [{"user_id": b}, {"user_id": b}]).all()
        assert len(ids) == 2  # the caller's RETURNING rows, untouched
        if strategy != "deferred":
            assert values(s, users) == [4, 4, 2]
        s.commit()
        assert values(s, users) == [4, 4, 2]
    assert assert_counts(engine) == {a: 4, b: 4, c: 2}


@pytest.mark.parametrize("sync", [False, "evaluate", "fetch", "auto"])
def test_update_foreign_key_with_criteria(engine, strategy, sync):
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        users = loaded(s, m, (a, b, c))
        moved = s.scalars(select(m.Question).where(m.Question.user_id == a)).all()  # in the session
        result = s.execute(
            update(m.Question).where(m.Question.user_id == a, m.Question.title != "q0").values(user_id=c),
            execution_options={"synchronize_session": sync},
        )
        assert result.rowcount == 2
        result = s.execute(
            update(m.Question).where(m.Question.user_id == b).values(user_id=None),
            execution_options={"synchronize_session": sync},
        )
        assert result.rowcount == 2
        s.commit()
        assert values(s, users) == [1, 0, 2]
        if sync:
            assert sorted(q.user_id or 0 for q in moved) == sorted([a, c, c])
    assert assert_counts(engine) == {a: 1, b: 0, c: 2}


def test_update_by_primary_key(engine, strategy):
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine) as s:
        ids = s.scalars(select(m.Question.id).where(m.Question.user_id == a).order_by(m.Question.id)).all()
        s.execute(update(m.Question), [{"id": ids[0], "user_id": b}, {"id": ids[1], "user_id": c},
                                       {"id": ids[2], "title": "renamed"}])
        s.commit()
    assert assert_counts(engine) == {a: 1, b: 3, c: 1}


def test_update_by_primary_key_repeating_a_key(engine, strategy):
    """A key given twice: the row ends as its last parameter set says, and is
    counted from where it was to where it ends (not once per parameter set)."""
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        users = loaded(s, m, (a, b, c))
        ids = s.scalars(select(m.Question.id).where(m.Question.user_id == a).order_by(m.Question.id)).all()
        s.execute(update(m.Question), [{"id": ids[0], "user_id": b}, {"id": ids[0], "user_id": c},
                                       {"id": ids[1], "user_id": c}, {"id": ids[1], "user_id": a}])
        assert s.scalars(select(m.Question.user_id).where(m.Question.id.in_(ids[:2])).order_by(m.Question.id)
                         ).all() == [c, a]
        s.commit()
        assert values(s, users) == [2, 2, 1]
    assert assert_counts(engine) == {a: 2, b: 2, c: 1}


def test_update_by_primary_key_with_criteria(engine, strategy):
    """A bulk UPDATE by primary key with its own WHERE: a row the WHERE leaves
    alone is not counted, and a key given twice is judged by the row as the
    first parameter set left it (the database's order)."""
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine) as s:
        ids = s.scalars(select(m.Question.id).where(m.Question.user_id == a).order_by(m.Question.id)).all()
        other = s.scalars(select(m.Question.id).where(m.Question.user_id == b)).first()
        s.execute(update(m.Question).where(m.Question.user_id == a),
                  [{"id": ids[0], "user_id": b}, {"id": ids[0], "user_id": c},  # the 2nd no longer matches
                   {"id": other, "user_id": c}],  # not a's: left alone
                  execution_options={"synchronize_session": None})
        s.commit()
        assert s.scalar(select(m.Question.user_id).where(m.Question.id == ids[0])) == b
    assert assert_counts(engine) == {a: 2, b: 3, c: 0}


@pytest.mark.parametrize("sync", [False, "evaluate", "fetch"])
def test_delete_with_criteria(engine, strategy, sync):
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        users = loaded(s, m, (a, b, c))
        result = s.execute(delete(m.Question).where(m.Question.user_id.in_([a, b]), m.Question.title != "q1"),
                           execution_options={"synchronize_session": sync})
        assert result.rowcount == 3
        s.commit()
        assert values(s, users) == [1, 1, 0]
    assert assert_counts(engine) == {a: 1, b: 1, c: 0}


def test_delete_returning_rows_unchanged(engine, strategy, backend):
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine) as s:
        titles = s.scalars(delete(m.Question).where(m.Question.user_id == a).returning(m.Question.title)).all()
        assert sorted(titles) == ["q0", "q1", "q2"]
        s.commit()
    assert assert_counts(engine) == {a: 0, b: 2, c: 0}


def test_update_of_other_columns_costs_nothing(engine, statements):
    m, (a, b, c) = prepare(engine, "bulk")
    with Session(engine) as s:
        s.connection()
        with statements.record() as rec:
            s.execute(update(m.Question).where(m.Question.user_id == a).values(title="same parent"),
                      execution_options={"synchronize_session": False})
        assert len(rec) == 1 and rec.sql()[0].lstrip().upper().startswith("UPDATE QUESTIONS")
        s.commit()


def test_bulk_statement_emits_one_counter_update(engine, statements):
    m, (a, b, c) = prepare(engine, "bulk")
    with Session(engine) as s:
        with statements.record() as rec:
            s.execute(insert(m.Question), [{"user_id": (a, b, c)[i % 3]} for i in range(30)])
        assert len(rec.updates_to("users")) == 1
        s.commit()
    assert assert_counts(engine) == {a: 13, b: 12, c: 10}


def test_suspended_bulk_statement_not_counted(engine, strategy):
    orm_kept_only(strategy, "suspended() cannot suspend the database's triggers: they count inside it")
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine) as s:
        with countercache.suspended(s):
            s.execute(insert(m.Question), [{"user_id": c}])
        s.commit()
        assert exact_value(s, s.get(m.User, c)) == 0


@pytest.mark.servers_only
def test_concurrent_bulk_deletes_count_once(engine, strategy):
    m, (a, b, c) = prepare(engine, strategy)
    s1, s2 = Session(engine), Session(engine)
    s1.execute(delete(m.Question).where(m.Question.user_id == a))  # holds the rows' locks
    errors = []

    def second():
        try:
            result = s2.execute(delete(m.Question).where(m.Question.user_id == a))
            assert result.rowcount == 0  # the rows were gone once the lock was released
            s2.commit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.5)
    s1.commit()
    thread.join(30)
    s1.close()
    s2.close()
    assert not errors, errors
    assert assert_counts(engine) == {a: 0, b: 2, c: 0}


def test_core_statements_on_counted_tables_through_the_session_are_refused(engine):
    """A Core statement on a counted child table, run through the session, is
    refused before it runs (it would not be counted), naming the counter and
    the ORM statement that is; Core statements that change nothing counted
    run; inside suspended() everything runs."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20), default="")
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = countercache.counter_cache("questions")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(20), default="")
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    Base.metadata.create_all(engine)
    questions = Question.__table__
    with Session(engine) as s:
        s.add(User(id=1))
        s.commit()
        for statement in (questions.insert().values(id=1, user_id=1), questions.delete(),
                          questions.update().values(user_id=None)):
            with pytest.raises(countercache.CounterCacheError,
                               match=r"User\.question_count: a Core (INSERT|UPDATE|DELETE) on questions run through "
                                     r"the session is not counted; run it on the mapped class \(Question"):
                s.execute(statement)
        s.execute(insert(Question).values(id=2, user_id=1))  # ORM: counted
        s.execute(questions.update().values(title="x"))  # nothing counted changes
        s.execute(User.__table__.update().values(name="y"))
        with countercache.suspended(s):
            s.execute(questions.insert().values(id=3, user_id=1))
        s.commit()
    assert [(d.pk, d.stored, d.actual) for d in countercache.check(engine)] == [(1, 1, 2)]  # (the suspended one)


@pytest.mark.parametrize("render_nulls", [False, True])
def test_insert_none_for_a_column_with_a_default(engine, strategy, render_nulls):
    """SQLAlchemy's bulk INSERT leaves a None out (the column's default
    applies) unless render_nulls: the row is counted with the value it gets."""
    _cc = countercache

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        open_count: Mapped[int] = _cc.counter_cache("questions", strategy=strategy,
                                                    where=lambda: Question.status == "open")
        score_total: Mapped[int] = _cc.counter_cache("questions", strategy=strategy, sum="score")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        status: Mapped[Optional[str]] = mapped_column(String(10), default="open")
        score: Mapped[Optional[int]] = mapped_column(default=2)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1))
        s.commit()
        s.execute(insert(Question), [{"user_id": 1, "status": None, "score": None}, {"user_id": 1, "score": 5}],
                  execution_options={"render_nulls": render_nulls})
        s.execute(insert(Question), {"user_id": 1, "status": None, "score": None},
                  execution_options={"render_nulls": render_nulls})
        s.commit()
        stored = s.execute(select(Question.status, Question.score).order_by(Question.id)).all()
        assert stored == ([(None, None), ("open", 5), (None, None)] if render_nulls else
                          [("open", 2), ("open", 5), ("open", 2)])
    assert _cc.check(engine) == []


def test_bindparams_take_their_values_from_the_parameters(engine, strategy):
    """``bindparam()`` in values() or where(), given by the parameters: counted
    with those values (the locking read binds them as the statement does)."""
    m, (a, b, c) = prepare(engine, strategy)
    with Session(engine) as s:
        first = s.scalars(select(m.Question.id).where(m.Question.user_id == a).order_by(m.Question.id)).first()
        s.execute(insert(m.Question).values(user_id=bindparam("owner")), [{"owner": c}, {"owner": c}])
        s.execute(insert(m.Question).values(user_id=bindparam("owner")).execution_options(dml_strategy="raw"),
                  [{"owner": b}])
        result = s.execute(update(m.Question).where(m.Question.id == bindparam("qid")),
                           {"qid": first, "user_id": b})
        assert result.rowcount == 1
        s.commit()
    assert assert_counts(engine) == {a: 2, b: 4, c: 2}


def test_parameter_list_not_naming_rows_by_key_refused(engine, statements):
    """dml_strategy="core_only" with a parameter list runs the statement once
    per set, its rows chosen by its own criteria: countercache cannot tell
    which, and refuses before anything runs."""
    m, (a, b, c) = prepare(engine, "bulk")
    with Session(engine) as s:
        stmt = (update(m.Question).where(m.Question.id == bindparam("qid")).values(user_id=bindparam("owner"))
                .execution_options(dml_strategy="core_only"))
        with statements.record() as rec, pytest.raises(countercache.CounterCacheError,
                                                       match=r"User\.question_count: a bulk UPDATE/DELETE with a "
                                                             r"parameter list is counted by the primary key"):
            s.execute(stmt, [{"qid": 1, "owner": c}])
        assert not rec.updates_to("questions")
        s.rollback()
    assert assert_counts(engine) == {a: 3, b: 2, c: 0}


@pytest.mark.parametrize("shape", ["composite key", "own key"])
def test_an_update_setting_the_primary_key_and_a_counted_column(engine, strategy, shape):
    """The rows of an UPDATE are read again by their key after it, to count what
    they became: one that also sets the key cannot be, and is refused before it
    runs (outside tester: the moved row was taken off its old parent and never
    added to the new one, with any synchronize_session). The database's triggers
    count it."""
    from sqlalchemy import text

    class Base(DeclarativeBase):
        pass

    class Course(Base):
        __tablename__ = "pk_courses"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        links: Mapped[list["Link"]] = relationship()
        link_count: Mapped[int] = countercache.counter_cache("links", strategy=strategy)

    if shape == "composite key":
        class Link(Base):
            __tablename__ = "pk_links"
            student: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            course_id: Mapped[int] = mapped_column(ForeignKey("pk_courses.id"), primary_key=True)

        move = update(Link).where(Link.student == 1, Link.course_id == 1).values(course_id=2)
    else:
        class Link(Base):  # type: ignore[no-redef]
            __tablename__ = "pk_links"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            student: Mapped[int] = mapped_column()
            course_id: Mapped[int] = mapped_column(ForeignKey("pk_courses.id"))

        move = update(Link).where(Link.id == 1).values(id=Link.id + 10, course_id=2)

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add_all([Course(id=1), Course(id=2)])
            s.flush()
            s.execute(insert(Link), [{"student": 1, "course_id": 1, **({} if shape == "composite key" else {"id": 1})}])
            s.commit()
        with Session(engine) as s:
            if strategy == "trigger":
                s.execute(move)
                s.commit()
            else:
                with pytest.raises(countercache.CounterCacheError, match=r"Course\.link_count: an UPDATE statement "
                                   r"that sets Link's primary key \(.*\) and a counted column together"):
                    s.execute(move)
                s.rollback()
        with engine.connect() as c:
            moved = c.execute(text("SELECT course_id FROM pk_links")).scalar_one()
        assert moved == (2 if strategy == "trigger" else 1)  # (refused: nothing ran)
        assert countercache.check(engine) == []
    finally:
        Base.metadata.drop_all(engine)
